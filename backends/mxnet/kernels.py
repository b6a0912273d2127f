"""The MXNet backend's custom pieces, each beside a plain reference written with MXNet's own ops.

:mod:`.model` writes the book's architecture once and calls the few operations that have a
faster formulation through an op set (:class:`Ops`): :data:`FAST` (the kernels below, what the
backend trains with) or :data:`PLAIN` (the references, the operations the book uses). The
model's ``fast`` flag picks one when it is built; nothing else branches on it. Each pair
computes the same values (to float32 round-off) and is tested against each other in
``tests/test_mxnet_kernels.py``; why each kernel is faster is said beside it, and the measured
figures are in ``benchmarks/README.md`` ("MXNet kernels").

Every function takes ``F`` (``mx.ndarray`` imperatively, ``mx.symbol`` while a graph is traced)
so that both sets run in a hybridized graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FAST", "MASK_VALUE", "Ops", "PLAIN", "activation", "activation_reference", "add",
           "add_positions", "add_positions_reference", "add_reference", "gather_rows",
           "gather_rows_reference", "key_mask_bias", "layer_norm", "layer_norm_reference",
           "masked_softmax", "masked_softmax_reference", "ops"]

#: added to the attention scores of padded keys (the book's masked-softmax fill value):
#: exp(-1e6 - max) is exactly 0 in float32
MASK_VALUE = -1e6


def _legacy(F: Any, op: str, *arrays: Any, **kwargs: Any) -> Any:
    """A legacy (``mx.nd`` / ``mx.sym``) operator on numpy arrays or symbols."""
    return getattr(F, op)(*(a.as_nd_ndarray() for a in arrays), **kwargs).as_np_ndarray()


def _fc(F: Any, x: Any, weight: Any, units: int) -> Any:
    return F.npx.fully_connected(x, weight, None, num_hidden=units, no_bias=True, flatten=False)


# -- same-shape sums ----------------------------------------------------------------------------

def add(F: Any, a: Any, b: Any) -> Any:
    """``a + b`` of two arrays of the same shape, as the legacy ``elemwise_add``: its backward
    passes the gradient through, where the numpy ``+`` (a broadcasting op) copies it into both
    operands (a full pass each)."""
    return _legacy(F, "elemwise_add", a, b)


def add_reference(F: Any, a: Any, b: Any) -> Any:
    """``a + b`` (the numpy operator)."""
    return a + b


# -- activations ------------------------------------------------------------------------------

_SQRT_HALF = 0.7071067811865476


def activation(F: Any, x: Any, kind: str) -> Any:
    """``relu(x)`` or the exact GELU ``x * Phi(x)`` (``kind``: ``"relu"``, ``"gelu"``) as one
    fused operator each (``LeakyReLU``'s ``gelu`` is the erf form): one pass forward and
    backward where the formula below takes five."""
    if kind == "gelu":
        return F.npx.leaky_relu(x, act_type="gelu")
    return F.npx.relu(x)


def activation_reference(F: Any, x: Any, kind: str) -> Any:
    """The activations written out: ``relu``, and GELU as ``0.5 x (1 + erf(x / sqrt 2))``."""
    if kind == "gelu":
        return 0.5 * x * (1.0 + F.npx.erf(x * _SQRT_HALF))
    return F.npx.relu(x)


# -- layer normalization ------------------------------------------------------------------------

def layer_norm(F: Any, x: Any, gamma: Any, beta: Any, eps: float, units: int) -> Any:
    """Layer normalization over the last axis (``units`` wide) with every reduction and
    broadcast written as a matrix product.

    MXNet 1.9's ``LayerNorm`` backward on the CPU runs generic single-threaded reductions;
    mean and variance as products with a constant ``1/H`` vector, and the per-row and
    per-channel broadcasts as rank-1 products, run on the BLAS instead (the largest single
    saving of the training step). The rest is written for few full-size passes in the
    backward: sums as :func:`add` (the mean subtracted as an added rank-1 product with a
    ``-1`` column), ``square`` rather than ``x * x``."""
    average = F.np.full((1, units), 1.0 / units)  # x @ average.T: the mean of every row
    negate = F.np.full((units, 1), -1.0)          # v @ negate.T: -v of every row to all columns
    mean = _fc(F, x, average, 1)
    centered = add(F, x, _fc(F, mean, negate, units))
    var = _fc(F, F.np.square(centered), average, 1)
    # rstd (rows) x gamma (columns) as one rank-1 product; beta to every row likewise
    scale = _fc(F, (var + eps) ** -0.5, F.np.expand_dims(gamma, -1), units)
    shift = _fc(F, F.np.ones_like(mean), F.np.expand_dims(beta, -1), units)
    return add(F, centered * scale, shift)


def layer_norm_reference(F: Any, x: Any, gamma: Any, beta: Any, eps: float, units: int) -> Any:
    """MXNet's fused ``LayerNorm`` (what ``gluon.nn.LayerNorm`` runs)."""
    return F.npx.layer_norm(x, gamma=gamma, beta=beta, axis=-1, eps=eps)


# -- the masked softmax of attention -----------------------------------------------------------

def key_mask_bias(F: Any, valid_lens: Any, scores: Any, num_heads: int) -> Any:
    """:data:`MASK_VALUE` where a key's position is ``>= valid_lens[b]``, 0 elsewhere, in the
    shape of ``scores`` ``(batch * heads, queries, keys)``. Full-shape (a ``broadcast_like`` of a
    per-key row) so that adding it to the scores is a same-shape sum: the backward of a
    broadcasting sum is a reduction over the broadcast axis; this one passes the gradient
    through, and ``valid_lens`` needs none."""
    positions = F.npx.arange_like(scores, axis=-1)
    padded = (F.np.expand_dims(valid_lens, -1) <= F.np.expand_dims(positions, 0))
    bias = F.np.repeat(padded.astype("float32") * MASK_VALUE, num_heads, axis=0)
    return _legacy(F, "broadcast_like", F.np.expand_dims(bias, 1), scores)


def masked_softmax(F: Any, scores: Any, valid_lens: Any, num_heads: int) -> Any:
    """Softmax over the keys of ``scores`` ``(batch * heads, queries, keys)``, keys at positions
    ``>= valid_lens[b]`` (``valid_lens``: ``(batch,)``) with zero weight: :func:`key_mask_bias`
    added, then the plain oneDNN softmax (MXNet 1.9 has no ``npx.masked_softmax``, and
    ``softmax(use_length=True)`` is slower than the plain softmax plus the bias).

    Non-finite scores at padded keys are not masked away: ``nan + MASK_VALUE`` is NaN and
    ``inf + MASK_VALUE`` is inf, so they reach the softmax of their row (the reference
    overwrites them)."""
    return F.npx.softmax(add(F, scores, key_mask_bias(F, valid_lens, scores, num_heads)),
                         axis=-1)


def masked_softmax_reference(F: Any, scores: Any, valid_lens: Any, num_heads: int) -> Any:
    """The book's masked softmax: scores of padded keys replaced by :data:`MASK_VALUE`
    (``npx.sequence_mask``, here along the keys of every ``batch * heads`` row), then softmax."""
    lens = F.np.repeat(valid_lens, num_heads, axis=0)
    by_key = F.np.swapaxes(scores, 1, 2)  # (B*heads, keys, queries): keys as the sequence axis
    masked = F.npx.sequence_mask(by_key, lens, use_sequence_length=True, value=MASK_VALUE,
                                 axis=1)
    return F.npx.softmax(F.np.swapaxes(masked, 1, 2), axis=-1)


# -- rows at positions ---------------------------------------------------------------------------

def gather_rows(F: Any, X: Any, positions: Any) -> Any:
    """``X[b, positions[b, j]]`` for every ``(b, j)``: ``(batch, R, hidden)`` rows of ``X``
    ``(batch, len, hidden)`` at ``positions`` ``(batch, R)``, as one ``take`` of the flattened
    rows at ``b * len + position`` (built in the graph; its backward scatter-adds, so repeated
    positions are fine, and is faster than ``gather_nd``'s on the CPU)."""
    # in int32 (float32 would round indices beyond 2^24)
    length = F.np.ones_like(F.npx.arange_like(X, axis=1), dtype="int32").sum()  # 0-d: len
    examples = F.npx.arange_like(positions, axis=0).astype("int32")
    rows = F.np.expand_dims(examples, -1) * length.astype("int32") + positions.astype("int32")
    return F.np.take(F.npx.reshape(X, (-5, -2)), rows, axis=0, mode="clip")


def gather_rows_reference(F: Any, X: Any, positions: Any) -> Any:
    """The same rows through ``gather_nd`` at ``(example, position)`` index pairs (the book
    indexes ``X[batch_idx, pred_positions]``, which a traced graph cannot)."""
    examples = (F.np.expand_dims(F.npx.arange_like(positions, axis=0), -1)
                + F.np.zeros_like(positions, dtype="float32"))
    indices = F.np.stack([examples.astype("int32"), positions.astype("int32")])
    return F.npx.gather_nd(X, indices)


# -- learned positional embeddings -------------------------------------------------------------

def add_positions(F: Any, X: Any, tokens: Any, table: Any, max_len: int, hidden: int) -> Any:
    """``X + table[:, :len]`` for ``X`` ``(batch, len, hidden)`` (the embeddings of ``tokens``)
    and the positional table ``(1, max_len, hidden)``: row ``j`` of the table for every token at
    position ``j``, through an embedding lookup of a ``(batch, len)`` grid of positions (the
    lookup's backward is a scatter-add; a broadcast add's is a reduction over the batch)."""
    positions = (F.np.expand_dims(F.npx.arange_like(tokens, axis=1), 0)
                 + F.np.zeros_like(tokens, dtype="float32"))
    rows = F.npx.reshape(table, (-1, hidden))
    return add(F, X, F.npx.embedding(positions, rows, input_dim=max_len, output_dim=hidden))


def add_positions_reference(F: Any, X: Any, tokens: Any, table: Any, max_len: int,
                            hidden: int) -> Any:
    """``X + table[:, :len]``, the book's broadcast add."""
    return X + _legacy(F, "slice_like", table, X, axes=(1,))


# -- the op sets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ops:
    """The operations :mod:`.model` takes from this module (the same signatures in both sets)."""

    name: str
    add: Callable[..., Any]
    layer_norm: Callable[..., Any]
    masked_softmax: Callable[..., Any]
    gather_rows: Callable[..., Any]
    add_positions: Callable[..., Any]
    activation: Callable[..., Any]


FAST = Ops("fast", add, layer_norm, masked_softmax, gather_rows, add_positions, activation)
PLAIN = Ops("plain", add_reference, layer_norm_reference, masked_softmax_reference,
            gather_rows_reference, add_positions_reference, activation_reference)


def ops(fast: bool) -> Ops:
    """:data:`FAST` or :data:`PLAIN`."""
    return FAST if fast else PLAIN
