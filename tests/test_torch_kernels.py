"""The torch backend's fast path against its plain model: every custom autograd Function by a
float64 ``gradcheck`` and against its plain reference (NaN and Inf included), and the whole
fast training step against the plain one with dropout on, the same masks injected into both."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import make_batch, tiny_config

from conftest import skip_unless_backend

skip_unless_backend("torch")  # before importing torch: a skip with the pip hint, not an error

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402

from bertlite.backends.torch import fast, kernels  # noqa: E402
from bertlite.backends.torch import step as torch_step  # noqa: E402
from bertlite.backends.torch.model import MASK_VALUE, BERTModel, MaskLM  # noqa: E402
from bertlite.backends.torch.packing import group_views, pack, select  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.FUSED_LINEAR,
                                reason="this torch build has no oneDNN fused linear")
F64 = dict(dtype=torch.float64, requires_grad=True)


def rand(*shape: int, seed: int = 0, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=kwargs.pop("dtype", torch.float32)
                       ).requires_grad_(kwargs.pop("requires_grad", False))


def key_mask(lens: list[int], n: int, dtype: torch.dtype) -> torch.Tensor:
    valid = torch.arange(n)[None, :] < torch.tensor(lens)[:, None]
    return torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, MASK_VALUE).view(
        len(lens), 1, 1, n)


def keep(shape, p: float = 0.25, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) >= p).to(dtype) / (1 - p)


# -- gradcheck of every Function, in float64 ---------------------------------------------------

@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_fused_linear(relu):
    x, w, b = rand(5, 4, **F64), rand(3, 4, seed=1, **F64), rand(3, seed=2, **F64)
    assert gradcheck(lambda x, w, b: kernels.FusedLinear.apply(x, w, b, relu), (x, w, b))


def test_gradcheck_ffn():
    x, w1, b1 = rand(6, 4, **F64), rand(5, 4, seed=1, **F64), rand(5, seed=2, **F64)
    w2, b2 = rand(4, 5, seed=3, **F64), rand(4, seed=4, **F64)
    assert gradcheck(kernels.FFN.apply, (x, w1, b1, w2, b2))


def test_gradcheck_cross_entropy():
    logits, labels = rand(70, 5, **F64), torch.randint(0, 5, (70,))  # more than one chunk
    assert gradcheck(lambda z: kernels.CrossEntropy.apply(z, labels), (logits,))


def test_gradcheck_decoder_cross_entropy(monkeypatch):
    monkeypatch.setattr(kernels, "DECODER_CHUNK", 4)  # several chunks, the last one short
    hidden, w, b = rand(10, 3, **F64), rand(7, 3, seed=1, **F64), rand(7, seed=2, **F64)
    labels = torch.randint(0, 7, (10,))
    assert gradcheck(lambda h, w, b: kernels.DecoderCrossEntropy.apply(h, w, b, labels),
                     (hidden, w, b))


def test_gradcheck_dropout_add():
    x, y = rand(4, 6, **F64), rand(4, 6, seed=1, **F64)
    assert gradcheck(lambda x, y: kernels.DropoutAdd.apply(x, y, keep((4, 6))), (x, y))


@pytest.mark.parametrize("with_keep", [False, True])
def test_gradcheck_attention(with_keep):
    q, k, v = (rand(2 * 2, 5, 3, seed=s, **F64) for s in range(3))
    mask = key_mask([5, 3], 5, torch.float64)
    mask_keep = keep((4, 5, 5)) if with_keep else None
    assert gradcheck(lambda q, k, v: kernels.Attention.apply(q, k, v, mask, mask_keep),
                     (q, k, v))


def _layout(batch_size: int = 64, length: int = 5, queries: bool = False):
    lens = torch.from_numpy(np.random.default_rng(0).integers(1, length + 1, batch_size))
    packing = pack(lens, batch_size, length)
    if not queries:
        return lens, packing, packing
    rows = torch.tensor([1, length + 2, 7 * length + 1, 40 * length])
    return lens, packing, select(packing, lens, rows)


@pytest.mark.parametrize("queries", [False, True])
def test_gradcheck_projections(queries):
    """Projections leave copies of valid rows in the padded slots, whose gradients attention
    makes zero: the check zeroes them too."""
    heads, hidden = 2, 4
    _, packing, layout = _layout(queries=queries)
    assert len(packing.groups) == 2
    x = rand(packing.rows.shape[0], hidden, **F64)
    params = [rand(hidden, hidden, seed=s, **F64) if s % 2 == 0 else rand(hidden, seed=s, **F64)
              for s in range(4)]
    valid = torch.zeros(layout.num_slots, hidden, dtype=torch.float64)
    valid[layout.rows] = 1.0
    masks = group_views(valid, layout, heads)

    def project(x, *params):
        outputs = fast.Projections.apply(x, layout, heads, *params)
        return tuple(o * masks[i % len(masks)] for i, o in enumerate(outputs))

    assert gradcheck(project, (x, *params))


def test_gradcheck_output_and_unpack():
    heads, hidden = 2, 4
    _, packing, _ = _layout()
    groups = [rand(size * heads, n, hidden // heads, seed=g, **F64)
              for g, (size, n, _) in enumerate(packing.groups)]
    w, b = rand(hidden, hidden, seed=7, **F64), rand(hidden, seed=8, **F64)
    assert gradcheck(lambda w, b, *g: fast.Output.apply(packing, heads, w, b, *g),
                     (w, b, *groups), fast_mode=True)
    x = rand(packing.rows.shape[0], hidden, **F64)
    assert gradcheck(lambda x: fast.Unpack.apply(x, packing.padded_rows,
                                                 packing.batch_size * packing.length,
                                                 packing.cls_rows), (x,))


# -- each kernel against its plain reference, NaN and Inf included ------------------------------

NONFINITE = [None, float("nan"), float("inf"), -float("inf")]


def poison(t: torch.Tensor, value: float | None, index=(1, 2)) -> torch.Tensor:
    t = t.detach().clone()
    if value is not None:
        t[index] = value
    return t.requires_grad_()


def compare(fast_fn, plain_fn, inputs, grad_seed: int = 5):
    """Outputs and input gradients of both, NaN where one has NaN, Inf where one has Inf."""
    a = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out_a, out_b = fast_fn(*a), plain_fn(*b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5, equal_nan=True)
    grad = rand(*out_a.shape, seed=grad_seed)
    out_a.backward(grad)
    out_b.backward(grad)
    for x, y in zip(a, b):
        if x.requires_grad:
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("relu", [False, True])
def test_fused_linear_equals_the_plain_op(value, relu):
    x, w, b = poison(rand(6, 4), value), rand(3, 4, seed=1, requires_grad=True), rand(3, seed=2)
    compare(lambda x, w: kernels.linear(x, w, b, relu),
            lambda x, w: kernels.linear_reference(x, w, b, relu), (x, w))


def test_fused_relu_keeps_nan():
    """oneDNN's ReLU epilogue alone would turn NaN into 0 (the bug this guards against)."""
    x = torch.tensor([[float("nan"), 1.0]])
    w, b = torch.ones(3, 2), torch.zeros(3)
    assert torch.isnan(kernels.mkldnn_linear(x, w, b, relu=True)).all()
    assert torch.isnan(kernels.mkldnn_linear(x, w, b.new_full((3,), float("nan")),
                                             relu=True)[0]).all()


@pytest.mark.parametrize("value", NONFINITE)
def test_ffn_equals_the_plain_op(value):
    x = poison(rand(6, 4), value)
    params = [rand(5, 4, seed=1), rand(5, seed=2), rand(4, 5, seed=3), rand(4, seed=4)]
    for p in params:
        p.requires_grad_()
    compare(kernels.FFN.apply, kernels.ffn_reference, (x, *params))


@pytest.mark.parametrize("value", NONFINITE)
def test_cross_entropy_equals_the_plain_op(value):
    logits, labels = poison(rand(130, 9), value), torch.randint(0, 9, (130,))
    compare(lambda z: kernels.CrossEntropy.apply(z, labels),
            lambda z: kernels.cross_entropy_reference(z, labels), (logits,))


@pytest.mark.parametrize("value", NONFINITE)
def test_decoder_cross_entropy_equals_the_plain_op(value, monkeypatch):
    monkeypatch.setattr(kernels, "DECODER_CHUNK", 16)
    hidden = poison(rand(40, 8), value)
    w, b = rand(11, 8, seed=1, requires_grad=True), rand(11, seed=2, requires_grad=True)
    labels = torch.randint(0, 11, (40,))
    compare(lambda h, w, b: kernels.DecoderCrossEntropy.apply(h, w, b, labels),
            lambda h, w, b: kernels.decoder_cross_entropy_reference(h, w, b, labels),
            (hidden, w, b))


@pytest.mark.parametrize("value", NONFINITE)
def test_dropout_add_equals_the_plain_op(value):
    x, y = rand(5, 6, requires_grad=True), poison(rand(5, 6, seed=1), value)
    mask = keep((5, 6), p=0.5, dtype=torch.float32)
    compare(lambda x, y: kernels.DropoutAdd.apply(x, y, mask),
            lambda x, y: kernels.dropout_add_reference(x, y, mask), (x, y))


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("with_keep", [False, True])
def test_attention_equals_the_plain_op(value, with_keep):
    q = poison(rand(6, 5, 4), value, index=(1, 2, 0))
    k, v = rand(6, 5, 4, seed=1, requires_grad=True), rand(6, 5, 4, seed=2, requires_grad=True)
    mask = key_mask([5, 2, 4], 5, torch.float32)
    mask_keep = keep((6, 5, 5), dtype=torch.float32) if with_keep else None
    compare(lambda q, k, v: kernels.Attention.apply(q, k, v, mask, mask_keep),
            lambda q, k, v: kernels.attention_reference(q, k, v, mask, mask_keep), (q, k, v))


def test_keep_mask_statistics_and_seed():
    X = torch.ones(1000, 1000)
    torch.manual_seed(0)
    out = kernels.dropout(X, 0.2, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.003
    assert torch.allclose(out[kept], torch.tensor(1 / 0.8), rtol=1e-4)
    assert abs(out.mean().item() - 1.0) < 0.005  # the expectation is kept
    torch.manual_seed(0)
    assert torch.equal(kernels.dropout(X, 0.2, training=True), out)
    assert kernels.dropout(X, 0.2, training=False) is X
    assert kernels.dropout(X, 0.0, training=True) is X
    Y = torch.ones(5, 7, requires_grad=True)  # the gradient is the same mask
    dropped = kernels.dropout(Y, 0.5, training=True)
    dropped.sum().backward()
    assert torch.equal(Y.grad, dropped.detach())


# -- the fast training step against the plain one -----------------------------------------------

class Masks:
    """Dropout masks in the padded batch's coordinates, one per dropout call in the order both
    paths make them (per layer: attention weights, add & norm 1, add & norm 2): given to the
    plain model through ``F.dropout`` and, moved to the packed layout, to the fast path
    through ``keep_mask``."""

    def __init__(self, batch, config, p: float, rows: torch.Tensor) -> None:
        b, n = batch.tokens.shape
        self.p, self.heads, self.b, self.n = p, config.num_heads, b, n
        self.lens = torch.from_numpy(np.asarray(batch.valid_lens)).long()
        self.packing = pack(self.lens, b, n)
        self.queries = select(self.packing, self.lens, rows)
        self.layers = config.num_layers
        g = torch.Generator().manual_seed(11)
        self.masks = []
        for _ in range(config.num_layers):
            self.masks.append(keep((b, self.heads, n, n), p, dtype=torch.float32, seed=int(
                torch.randint(0, 10**6, (), generator=g))))
            for _ in range(2):
                self.masks.append(keep((b, n, config.num_hiddens), p, dtype=torch.float32,
                                       seed=int(torch.randint(0, 10**6, (), generator=g))))
        self.calls = 0

    def plain_dropout(self, x, p=0.5, training=True, inplace=False):
        mask = self.masks[self.calls]
        self.calls += 1
        assert mask.numel() == x.numel()  # attention: (batch * heads, queries, keys)
        return x * mask.reshape(x.shape)

    def _query_positions(self, layout) -> list[list[int]]:
        if layout is self.packing:
            return [list(range(self.n))] * self.b
        need = torch.zeros(self.b * self.n, dtype=torch.bool)
        need[layout.padded_rows] = True
        return [torch.nonzero(row).reshape(-1).tolist() for row in need.view(self.b, self.n)]

    def fast_keep(self, shape, p, dtype):
        call = self.calls
        self.calls += 1
        mask = self.masks[call]
        last = call // 3 == self.layers - 1
        layout = self.queries if last else self.packing
        if call % 3:  # add & norm: the layout's packed rows
            out = mask.reshape(self.b * self.n, -1)[layout.padded_rows]
        else:  # attention: every group's (examples * heads, queries, keys)
            positions, parts, first = self._query_positions(layout), [], 0
            for (size, m, _), (_, n, _) in zip(layout.groups, self.packing.groups):
                for j in self.packing.order[first:first + size].tolist():
                    qpos = (positions[j] + [0] * m)[:m]
                    parts.append(mask[j][:, qpos, :n])
                first += size
            out = torch.cat([part.reshape(-1) for part in parts])
        assert out.numel() == math.prod(shape)
        return out.reshape(tuple(shape)).to(dtype)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_fast_step_equals_the_plain_one_with_dropout(monkeypatch, num_layers):
    """Dropout on, uneven valid_lens, two attention groups: the same losses and gradients."""
    config = tiny_config(vocab_size=200, dropout=0.3, num_layers=num_layers)
    batch = make_batch(200, batch=64, length=12, seed=4, preds=3)
    assert len(np.unique(batch.valid_lens)) > 3
    model = BERTModel.from_config(config, seed=0).train()
    tensors = torch_step.to_tensors(batch, torch.device("cpu"))
    used = torch.nonzero(tensors.mlm_weights.reshape(-1)).reshape(-1)
    rows = MaskLM.rows(tensors.tokens, tensors.pred_positions).index_select(0, used)
    assert fast.packs(model, tensors.tokens, tensors.valid_lens)
    results = []
    for on in (True, False):
        masks = Masks(batch, config, 0.3, rows)
        if on:
            monkeypatch.setattr(fast, "keep_mask", masks.fast_keep)
        else:
            monkeypatch.setattr(F, "dropout", masks.plain_dropout)
        model.fast = on
        model.zero_grad()
        losses = torch_step.batch_loss(model, tensors)
        losses[2].backward()
        assert masks.calls == 3 * num_layers  # every dropout drew its injected mask
        results.append(([float(x) for x in losses],
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
        monkeypatch.undo()
    (fast_losses, fast_grads), (plain_losses, plain_grads) = results
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_path_uses_no_fused_kernel(monkeypatch):
    """With ``fast=False`` a training step calls none of the kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a fused kernel ran on the plain path")

    for name in ("FusedLinear", "FFN", "CrossEntropy", "DecoderCrossEntropy", "DropoutAdd",
                 "Attention"):
        monkeypatch.setattr(getattr(kernels, name), "apply", forbidden)
    monkeypatch.setattr(kernels, "keep_mask", forbidden)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", forbidden)
    model = BERTModel.from_config(tiny_config(dropout=0.2), seed=0, fast=False).train()
    tensors = torch_step.to_tensors(make_batch(), torch.device("cpu"))
    losses = torch_step.batch_loss(model, tensors)
    losses[2].backward()
    assert all(torch.isfinite(x) for x in losses)
    model.fast = True
    with pytest.raises(AssertionError, match="fused kernel"):
        torch_step.batch_loss(model, tensors)


def test_non_finite_weights_give_the_plain_losses():
    """A NaN weight in the FFN and an Inf in an embedding: fast and plain agree on which
    losses are NaN or Inf."""
    config = tiny_config(vocab_size=200)
    model = BERTModel.from_config(config, seed=0).train()
    tensors = torch_step.to_tensors(make_batch(200, seed=2), torch.device("cpu"))
    with torch.no_grad():
        model.encoder.blks[0].ffn.dense1.weight[3, 1] = float("nan")
    results = []
    for on in (True, False):
        model.fast = on
        results.append(torch.stack(torch_step.batch_loss(model, tensors)[:2]).detach())
    torch.testing.assert_close(results[0], results[1], equal_nan=True)
    assert torch.isnan(results[0]).all()
