"""The book's BERT as Gluon ``HybridBlock``s of MXNet's numpy interface.

The architecture is the book's (post-LN Transformer encoder blocks ``ln(dropout(Y) + X)``,
multi-head attention with biases masked by ``valid_lens``, ReLU feed-forward networks, a learned
positional embedding, an MLM head applied only at ``pred_positions`` and an NSP head on the
``<cls>`` vector), written shape-agnostically so that ``net.hybridize(static_alloc=True,
static_shape=True)`` compiles it into one graph:

* positions come from ``npx.arange_like``, never from Python shapes;
* keys beyond ``valid_len`` get -1e6 added to their scores (a bias the scores' shape, built in
  the graph from ``valid_lens``), so the softmax gives them exactly zero weight, as the book's
  masked softmax does (MXNet 1.9 has no ``npx.masked_softmax``; ``softmax(use_length=True)``
  runs about 5x slower than the plain oneDNN softmax plus the bias);
* the MLM head gathers its rows with one ``take`` of the flattened encodings at indices built
  in the graph (:func:`gather_rows`);
* same-shape sums are the legacy ``elemwise_add`` (:func:`add`), whose backward is free.

For the training loss, :meth:`BERTModel.sparse_forward` computes the last encoder block only
where the loss reads it (a sparse last layer, as the PyTorch backend's): keys and values at
every token, but queries, attention output, add & norm and the feed-forward network at
``<cls>`` and the ``pred_positions`` only -- a fixed ``(batch, 1 + preds)`` set of rows, so the
graph keeps static shapes. Same loss and gradients as the full computation (to float32
round-off) at about two thirds of the encoder's work; ``forward`` (evaluation, ``get_bert_
encoding``) still encodes every position.

Parameters are laid out as :mod:`bertlite.params` names them: the Gluon structured names of
:meth:`BERTModel.canonical_parameters` map one to one onto the canonical names (LayerNorm
``gamma``/``beta`` become ``weight``/``bias``); Dense weights are ``(out, in)`` in Gluon too.
Every layer is built with its input size, so parameters have their shapes right after
``initialize`` and weights can be loaded before the first forward pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from mxnet import np
from mxnet.gluon import nn

from bertlite.config import BERTConfig
from bertlite.params import parameter_shapes

__all__ = [
    "AddNorm", "BERTEncoder", "BERTModel", "EncoderBlock", "LayerNorm", "MASK_VALUE", "MaskLM",
    "MultiHeadAttention", "NextSentencePred", "PositionWiseFFN", "add", "canonical_name",
    "gather_rows", "key_mask_bias",
]

#: LayerNorm's Gluon parameter names and their canonical (PyTorch) names
_RENAMES = {"gamma": "weight", "beta": "bias"}
#: added to the attention scores of padded keys (the book's masked-softmax fill value):
#: exp(-1e6 - max) is exactly 0 in float32
MASK_VALUE = -1e6


def canonical_name(gluon_name: str) -> str:
    """The canonical name of a structured Gluon parameter name (``encoder.blks.0.addnorm1.ln.
    gamma`` -> ``encoder.blks.0.addnorm1.ln.weight``)."""
    head, _, last = gluon_name.rpartition(".")
    return f"{head}.{_RENAMES.get(last, last)}" if head else _RENAMES.get(last, last)


def _dense(units: int, in_units: int, **kwargs) -> nn.Dense:
    # flatten=False: only the last axis is transformed; in_units: shapes known at initialize
    return nn.Dense(units, flatten=False, in_units=in_units, **kwargs)


def _fc(F, x, weight, units: int):
    return F.npx.fully_connected(x, weight, None, num_hidden=units, no_bias=True, flatten=False)


def _legacy(F: Any, op: str, *arrays: Any) -> Any:
    """A legacy (``mx.nd`` / ``mx.sym``) operator on numpy arrays or symbols."""
    return getattr(F, op)(*(a.as_nd_ndarray() for a in arrays)).as_np_ndarray()


def add(F: Any, a: Any, b: Any) -> Any:
    """``a + b`` of two arrays of the same shape, as the legacy ``elemwise_add``: its backward
    passes the gradient through, where the numpy ``+`` (a broadcasting op) copies it into
    both operands (a full pass each, ~15% of a LayerNorm's time on the CPU)."""
    return _legacy(F, "elemwise_add", a, b)


def gather_rows(F: Any, X: Any, positions: Any) -> Any:
    """``X[b, positions[b, j]]`` for every ``(b, j)``: ``(batch, R, hidden)`` rows of ``X``
    ``(batch, len, hidden)`` at ``positions`` ``(batch, R)``, as one ``take`` of the flattened
    rows at ``b * len + position`` (built in the graph; its backward scatter-adds, so repeated
    positions are fine, and is about twice as fast as ``gather_nd``'s on the CPU)."""
    # in int32 (float32 would round indices beyond 2^24)
    length = F.np.ones_like(F.npx.arange_like(X, axis=1), dtype="int32").sum()  # 0-d: len
    examples = F.npx.arange_like(positions, axis=0).astype("int32")
    rows = F.np.expand_dims(examples, -1) * length.astype("int32") + positions.astype("int32")
    return F.np.take(F.npx.reshape(X, (-5, -2)), rows, axis=0, mode="clip")


def key_mask_bias(F: Any, valid_lens: Any, scores: Any, num_heads: int) -> Any:
    """:data:`MASK_VALUE` where a key's position is ``>= valid_lens[b]``, 0 elsewhere, in the
    shape of ``scores`` ``(batch * heads, queries, keys)``. Full-shape (a ``broadcast_like``
    of a per-key row) so that adding it to the scores is a same-shape sum: the backward of a
    broadcasting sum reduces over the broadcast axis, several times the softmax's cost on the
    CPU; this one passes the gradient through and ``valid_lens`` needs none."""
    positions = F.npx.arange_like(scores, axis=-1)
    padded = (F.np.expand_dims(valid_lens, -1) <= F.np.expand_dims(positions, 0))
    bias = F.np.repeat(padded.astype("float32") * MASK_VALUE, num_heads, axis=0)
    return _legacy(F, "broadcast_like", F.np.expand_dims(bias, 1), scores)


class LayerNorm(nn.LayerNorm):
    """Layer normalization over the last axis (parameters ``gamma``/``beta`` as in Gluon,
    epsilon 1e-5 as in PyTorch) with every reduction and broadcast written as a matrix product.

    MXNet 1.9's ``LayerNorm`` backward on CPU runs generic (single-threaded) reductions and is
    about 20x slower than its forward pass; mean and variance as products with a constant
    ``1/H`` vector, and the per-row and per-channel broadcasts as rank-1 products, run on the
    BLAS instead and make forward plus backward about 2x faster (the largest single saving of
    the training step). The rest is written for few full-size passes in the backward: sums as
    :func:`add` (the mean subtracted as an added rank-1 product with a ``-1`` column),
    ``square`` rather than ``x * x``. Same values to float32 rounding.
    """

    def __init__(self, in_channels: int, epsilon: float = 1e-5, **kwargs) -> None:
        super().__init__(axis=-1, epsilon=epsilon, in_channels=in_channels, **kwargs)
        self._units = in_channels

    def hybrid_forward(self, F, data, gamma, beta):
        h = self._units
        average = F.np.full((1, h), 1.0 / h)   # x @ average.T: the mean of every row
        negate = F.np.full((h, 1), -1.0)       # v @ negate.T: -v of every row to all H columns
        mean = _fc(F, data, average, 1)
        centered = add(F, data, _fc(F, mean, negate, h))
        var = _fc(F, F.np.square(centered), average, 1)
        # rstd (rows) x gamma (columns) as one rank-1 product; beta to every row likewise
        scale = _fc(F, (var + self._epsilon) ** -0.5, F.np.expand_dims(gamma, -1), h)
        shift = _fc(F, F.np.ones_like(mean), F.np.expand_dims(beta, -1), h)
        return add(F, centered * scale, shift)


class MultiHeadAttention(nn.HybridBlock):
    """Multi-head scaled dot-product attention with biases; keys at positions
    ``>= valid_lens[b]`` get no weight (``valid_lens``: ``(batch,)``, or None for no mask).
    Queries and keys may differ in number (the sparse last layer's queries are a few rows).
    Hybridized, call it always with or always without ``valid_lens``: MXNet 1.9 keeps one
    graph per block."""

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, use_bias: bool = True,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens ({num_hiddens}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self._scale = 1.0 / math.sqrt(num_hiddens // num_heads)
        with self.name_scope():
            self.W_q = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.W_k = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.W_v = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.W_o = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.dropout = nn.Dropout(dropout)

    def _split_heads(self, F, X):
        # (B, L, H) -> (B, L, heads, d) -> (B, heads, L, d) -> (B*heads, L, d); swapaxes is
        # several times faster than the equivalent transpose in MXNet 1.9 on CPU
        X = F.np.swapaxes(F.npx.reshape(X, (-2, -2, self.num_heads, -1)), 1, 2)
        return F.npx.reshape(X, (-5, -2, -2))

    def _merge_heads(self, F, X):
        # (B*heads, L, d) -> (B, heads, L, d) -> (B, L, heads, d) -> (B, L, H)
        X = F.np.swapaxes(F.npx.reshape(X, (-6, -1, self.num_heads, -2, -2)), 1, 2)
        return F.npx.reshape(X, (-2, -2, -5))

    def hybrid_forward(self, F, queries, keys, values, valid_lens):
        q = self._split_heads(F, self.W_q(queries))
        k = self._split_heads(F, self.W_k(keys))
        v = self._split_heads(F, self.W_v(values))
        scores = F.npx.batch_dot(q, k, transpose_b=True) * self._scale  # (B*heads, Lq, Lk)
        if valid_lens is not None:
            scores = add(F, scores, key_mask_bias(F, valid_lens, scores, self.num_heads))
        weights = F.npx.softmax(scores, axis=-1)
        out = F.npx.batch_dot(self.dropout(weights), v)
        return self.W_o(self._merge_heads(F, out))


class PositionWiseFFN(nn.HybridBlock):
    """``dense2(relu(dense1(X)))`` on the last axis."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.dense1 = _dense(ffn_num_hiddens, num_hiddens)
            self.dense2 = _dense(num_hiddens, ffn_num_hiddens)

    def hybrid_forward(self, F, X):
        return self.dense2(F.npx.relu(self.dense1(X)))


class AddNorm(nn.HybridBlock):
    """Residual connection then layer normalization: ``ln(dropout(Y) + X)``."""

    def __init__(self, num_hiddens: int, dropout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.dropout = nn.Dropout(dropout)
            self.ln = LayerNorm(num_hiddens)

    def hybrid_forward(self, F, X, Y):
        return self.ln(add(F, self.dropout(Y), X))


class EncoderBlock(nn.HybridBlock):
    """A post-LN Transformer encoder block."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float,
                 use_bias: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias)
            self.addnorm1 = AddNorm(num_hiddens, dropout)
            self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens)
            self.addnorm2 = AddNorm(num_hiddens, dropout)

    def hybrid_forward(self, F, X, valid_lens, rows=None):
        """The block's output at every position, or with ``rows`` ``(batch, R)`` (positions)
        at those only, ``(batch, R, hidden)``: every position is a key, only ``rows`` are
        queries, and the position-wise layers run on those rows."""
        queries = X if rows is None else gather_rows(F, X, rows)
        Y = self.addnorm1(queries, self.attention(queries, X, X, valid_lens))
        return self.addnorm2(Y, self.ffn(Y))


class BERTEncoder(nn.HybridBlock):
    """Token, segment and learned positional embeddings, then ``num_layers`` encoder blocks."""

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_layers: int, dropout: float, max_len: int = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_hiddens, self.max_len = num_hiddens, max_len
        with self.name_scope():
            self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
            self.segment_embedding = nn.Embedding(2, num_hiddens)
            self.blks = nn.HybridSequential()
            for _ in range(num_layers):
                self.blks.add(EncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
                                           True))
            # BERT's positional embeddings are learned: a parameter long enough for max_len
            self.pos_embedding = self.params.get("pos_embedding",
                                                 shape=(1, max_len, num_hiddens))

    def hybrid_forward(self, F, tokens, segments, valid_lens, rows=None, pos_embedding=None):
        """The encodings ``(batch, len, hidden)``; with ``rows`` ``(batch, R)`` the last block
        computes only the encodings at those positions, ``(batch, R, hidden)``."""
        X = add(F, self.token_embedding(tokens), self.segment_embedding(segments))
        # row j of the table for every token at position j, through an embedding lookup of a
        # (B, L) grid of positions (the backward of a broadcast add is a slow reduction in
        # MXNet 1.9 on CPU; the lookup's is a fast scatter-add)
        positions = (F.np.expand_dims(F.npx.arange_like(tokens, axis=1), 0)
                     + F.np.zeros_like(tokens, dtype="float32"))
        table = F.npx.reshape(pos_embedding, (-1, self.num_hiddens))
        X = add(F, X, F.npx.embedding(positions, table, input_dim=self.max_len,
                                      output_dim=self.num_hiddens))
        last = len(self.blks) - 1
        for i, blk in enumerate(self.blks):
            X = blk(X, valid_lens) if rows is None or i < last else blk(X, valid_lens, rows)
        if rows is not None and last < 0:  # no blocks: the embeddings at those rows
            X = gather_rows(F, X, rows)
        return X


class MaskLM(nn.HybridBlock):
    """The MLM head ``decoder(ln(relu(dense(X))))`` at the gathered ``pred_positions``."""

    def __init__(self, vocab_size: int, num_hiddens: int, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.dense = _dense(num_hiddens, num_hiddens)
            self.ln = LayerNorm(num_hiddens)
            self.decoder = _dense(vocab_size, num_hiddens)

    def hybrid_forward(self, F, X, pred_positions):
        return self.decode(F, gather_rows(F, X, pred_positions))

    def decode(self, F: Any, masked_X: Any) -> Any:
        """Vocabulary logits of encodings ``(..., hidden)`` already at the predicted
        positions (``F``: ``mx.ndarray`` or, while a graph is traced, ``mx.symbol``)."""
        return self.decoder(self.ln(F.npx.relu(self.dense(masked_X))))


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
    is the :class:`~bertlite.config.BERTConfig` either way.

    Hybridized, the graph always receives all four arrays (MXNet 1.9 caches one graph per block,
    not one per input signature): a missing ``valid_lens`` is the full length (no masking) and a
    missing ``pred_positions`` one dummy position whose MLM output is dropped. (Symbolic calls,
    e.g. from an enclosing graph, must pass all four.) The training loss reads
    :meth:`sparse_forward`, whose last layer computes only the rows the loss reads.
    """

    def __init__(self, vocab_size: int, num_hiddens: int = 128, ffn_num_hiddens: int = 256,
                 num_heads: int = 2, num_layers: int = 2, dropout: float = 0.2,
                 max_len: int = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = BERTConfig(vocab_size=vocab_size, num_hiddens=num_hiddens,
                                 ffn_num_hiddens=ffn_num_hiddens, num_heads=num_heads,
                                 num_layers=num_layers, dropout=dropout, max_len=max_len)
        #: the devices the backend initialized the model on (set by ``MXNetBackend``)
        self.devices: list = []
        with self.name_scope():
            self.encoder = BERTEncoder(vocab_size, num_hiddens, ffn_num_hiddens, num_heads,
                                       num_layers, dropout, max_len)
            self.hidden = nn.Dense(num_hiddens, activation="tanh", in_units=num_hiddens)
            self.mlm = MaskLM(vocab_size, num_hiddens)
            self.nsp = NextSentencePred(num_hiddens)

    @classmethod
    def from_config(cls, config: BERTConfig) -> BERTModel:
        return cls(config.vocab_size, num_hiddens=config.num_hiddens,
                   ffn_num_hiddens=config.ffn_num_hiddens, num_heads=config.num_heads,
                   num_layers=config.num_layers, dropout=config.dropout, max_len=config.max_len)

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

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None):
        no_preds = pred_positions is None
        if valid_lens is None:
            valid_lens = np.full((tokens.shape[0],), tokens.shape[1], dtype="float32",
                                 ctx=tokens.ctx)
        if no_preds:
            pred_positions = np.zeros((tokens.shape[0], 1), dtype="int32", ctx=tokens.ctx)
        encoded_X, mlm_Y_hat, nsp_Y_hat = super().forward(
            tokens, segments, valid_lens.reshape(-1), pred_positions)
        return encoded_X, (None if no_preds else mlm_Y_hat), nsp_Y_hat

    def hybrid_forward(self, F, tokens, segments, valid_lens, pred_positions):
        encoded_X = self.encoder(tokens, segments, valid_lens)
        mlm_Y_hat = self.mlm(encoded_X, pred_positions)
        # the hidden layer of the NSP classifier reads the encoding of <cls> (position 0)
        nsp_Y_hat = self.nsp(self.hidden(_row(F, encoded_X, 0)))
        return encoded_X, mlm_Y_hat, nsp_Y_hat

    def sparse_forward(self, F: Any, tokens: Any, segments: Any, valid_lens: Any,
                       pred_positions: Any) -> tuple[Any, Any]:
        """``(mlm_Y_hat, nsp_Y_hat)`` -- what the pretraining loss reads -- with the last
        encoder block computed only at ``<cls>`` and the ``pred_positions`` (a sparse last
        layer: every token is still a key). The same values as :meth:`hybrid_forward`'s (to
        float32 round-off) in about two thirds of the encoder's work.

        ``F`` is ``mx.symbol`` while an enclosing graph is traced (the loss graph,
        :class:`.loss.PretrainingLoss`), or ``mx.ndarray`` on a model that is not hybridized;
        all four arrays are required (``valid_lens`` ``(batch,)``)."""
        # rows (B, 1 + P): <cls> (position 0), then the predicted positions
        cls_position = F.np.zeros_like(
            F.npx.slice(pred_positions, begin=(None, 0), end=(None, 1)))
        rows = F.np.concatenate([cls_position, pred_positions], axis=1)
        encoded = self.encoder(tokens, segments, valid_lens, rows)
        mlm_Y_hat = self.mlm.decode(
            F, F.npx.slice(encoded, begin=(None, 1, None), end=(None, None, None)))
        nsp_Y_hat = self.nsp(self.hidden(_row(F, encoded, 0)))
        return mlm_Y_hat, nsp_Y_hat


def _row(F: Any, X: Any, j: int) -> Any:
    """``X[:, j]`` of ``(batch, len, hidden)`` as ``(batch, hidden)``."""
    return F.npx.reshape(F.npx.slice(X, begin=(None, j, None), end=(None, j + 1, None)),
                         (-2, -1))
