"""The MXNet backend's fast path against its plain one: every kernel of
``bertlite.backends.mxnet.kernels`` against its reference (MXNet's own ops), forward and
gradients, on uneven valid lengths and non-finite inputs; and the fast model (kernels, sparse
last layer) against the plain model with dropout on, both seeing the same masks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build, make_batch, tiny_config

from bertlite.errors import BackendError
from bertlite.loss import bert_loss
from bertlite.optim import OptimizerSettings
from conftest import framework_installed

if not framework_installed("mxnet"):  # before importing mxnet: a skip with the pip hint
    pytest.skip('backend "mxnet" skipped: mxnet is not installed (pip install "bertlite[mxnet]")',
                allow_module_level=True)

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from bertlite.backends import mxnet as bmx  # noqa: E402
from bertlite.backends.mxnet import fast, kernels, step  # noqa: E402
from bertlite.backends.mxnet.loss import output_row_losses  # noqa: E402

VOCAB, LENGTH, PREDS, HEADS = 500, 12, 3, 2
RNG = np.random.default_rng(0)


def _array(values) -> mx.np.ndarray:
    return mx.np.array(np.asarray(values, dtype=np.float32))


def _run(fn, inputs: list[np.ndarray], grad_of: tuple[int, ...], head: np.ndarray | None = None,
         **kwargs):
    """``fn(mx.ndarray, *inputs, **kwargs)``'s output and the gradients of ``sum(out * head)``
    with respect to the inputs numbered in ``grad_of``."""
    arrays = [mx.np.array(x, dtype=x.dtype) for x in inputs]
    for i in grad_of:
        arrays[i].attach_grad()
    with autograd.record():
        out = fn(mx.ndarray, *arrays, **kwargs)
        loss = (out * _array(head if head is not None else np.ones(out.shape))).sum()
    loss.backward()
    return out.asnumpy(), [arrays[i].grad.asnumpy() for i in grad_of]


def _kernel_cases():
    """(name, fast, reference, inputs, which inputs get gradients, keyword arguments)."""
    b, length, hidden = 3, 6, 8
    x = RNG.normal(size=(b, length, hidden)).astype(np.float32) * 3 + 2
    y = RNG.normal(size=(b, length, hidden)).astype(np.float32)
    gamma = RNG.uniform(0.5, 1.5, hidden).astype(np.float32)
    beta = RNG.normal(size=hidden).astype(np.float32)
    scores = RNG.normal(size=(b * HEADS, length, length)).astype(np.float32) * 4
    lens = np.array([6, 2, 4], np.float32)  # uneven, one full
    positions = np.array([[0, 3, 3], [5, 1, 0], [2, 2, 4]], np.int32)  # repeats included
    tokens = RNG.integers(0, 50, (b, length)).astype(np.int32)
    table = RNG.normal(size=(1, 10, hidden)).astype(np.float32)
    return [
        ("add", kernels.add, kernels.add_reference, [x, y], (0, 1), {}),
        ("layer_norm", kernels.layer_norm, kernels.layer_norm_reference, [x, gamma, beta],
         (0, 1, 2), dict(eps=1e-5, units=hidden)),
        ("masked_softmax", kernels.masked_softmax, kernels.masked_softmax_reference,
         [scores, lens], (0,), dict(num_heads=HEADS)),
        ("gather_rows", kernels.gather_rows, kernels.gather_rows_reference, [x, positions],
         (0,), {}),
        ("add_positions", kernels.add_positions, kernels.add_positions_reference,
         [x, tokens, table], (0, 2), dict(max_len=10, hidden=hidden)),
    ]


CASES = {case[0]: case for case in _kernel_cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_its_reference(name):
    """Forward values and every input's gradient (under a random output gradient)."""
    _, fast_fn, reference, inputs, grad_of, kwargs = CASES[name]
    out_ref, grads_ref = _run(reference, inputs, grad_of, **kwargs)
    head = RNG.normal(size=out_ref.shape)
    out_ref, grads_ref = _run(reference, inputs, grad_of, head, **kwargs)
    out, grads = _run(fast_fn, inputs, grad_of, head, **kwargs)
    assert np.isfinite(out_ref).all()
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=2e-6)
    for i, g, g_ref in zip(grad_of, grads, grads_ref):
        scale = max(1.0, float(np.abs(g_ref).max()))
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"input {i}")


def test_masked_softmax_gives_padded_keys_exactly_zero_weight():
    _, fast_fn, reference, (scores, lens), _, kwargs = CASES["masked_softmax"]
    for fn in (fast_fn, reference):
        weights = fn(mx.ndarray, _array(scores), _array(lens), **kwargs).asnumpy()
        for row, n in enumerate(np.repeat(lens, HEADS).astype(int)):
            assert (weights[row, :, n:] == 0).all()
            np.testing.assert_allclose(weights[row].sum(-1), 1.0, rtol=1e-6)


def test_kernels_run_in_a_hybridized_graph():
    """Both op sets trace: the same values through a compiled graph as imperatively."""
    _, _, _, (x, gamma, beta), _, _ = CASES["layer_norm"]
    _, _, _, (scores, lens), _, _ = CASES["masked_softmax"]
    _, _, _, (_, positions), _, _ = CASES["gather_rows"]

    class Block(gluon.HybridBlock):
        def __init__(self, ops):
            super().__init__()
            self.ops = ops

        def hybrid_forward(self, F, x, gamma, beta, scores, lens, positions):
            normed = self.ops.layer_norm(F, x, gamma, beta, 1e-5, x_hidden)
            return (self.ops.gather_rows(F, self.ops.add(F, normed, x), positions),
                    self.ops.masked_softmax(F, scores, lens, HEADS))

    x_hidden = x.shape[-1]
    args = [_array(x), _array(gamma), _array(beta), _array(scores), _array(lens),
            mx.np.array(positions, dtype="int32")]
    for ops in (kernels.FAST, kernels.PLAIN):
        imperative = [o.asnumpy() for o in Block(ops)(*args)]
        block = Block(ops)
        block.hybridize(static_alloc=True, static_shape=True)
        for a, b in zip(block(*args), imperative):
            np.testing.assert_allclose(a.asnumpy(), b, rtol=1e-6, atol=1e-6, err_msg=ops.name)


# -- non-finite inputs -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["add", "layer_norm", "gather_rows", "add_positions"])
def test_non_finite_values_propagate_as_in_the_reference(name, bad):
    """A NaN or an infinity in one example gives the reference's non-finite outputs, in the
    same places, and leaves the other examples finite."""
    _, fast_fn, reference, inputs, _, kwargs = CASES[name]
    inputs = [x.copy() for x in inputs]
    inputs[0][1, 1, 3] = bad  # example 1, position 1 (which gather_rows takes too)
    expected = reference(mx.ndarray, *[mx.np.array(x, dtype=x.dtype) for x in inputs],
                         **kwargs).asnumpy()
    got = fast_fn(mx.ndarray, *[mx.np.array(x, dtype=x.dtype) for x in inputs],
                  **kwargs).asnumpy()
    assert not np.isfinite(expected).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_masked_softmax_non_finite_scores(bad):
    """At a valid key, a NaN or infinite score gives the reference's non-finite weights (the
    same softmax runs in both). At a padded key the reference overwrites it with the fill
    value, while the kernel adds the bias to it (``nan + MASK_VALUE`` is NaN,
    ``inf + MASK_VALUE`` inf), so it reaches that row's softmax: the documented difference
    (kernels.masked_softmax). Every other row is untouched in both."""
    _, fast_fn, reference, (scores, lens), _, kwargs = CASES["masked_softmax"]
    others = np.ones(scores.shape[:2], bool)
    others[2, 1] = False  # example 1 (rows 2, 3 of batch * heads) has length 2
    for key in (0, 4):  # valid, padded
        changed = scores.copy()
        changed[2, 1, key] = bad
        w_ref, w_fast = (fn(mx.ndarray, _array(changed), _array(lens), **kwargs).asnumpy()
                         for fn in (reference, fast_fn))
        assert not np.isfinite(w_fast[2, 1]).all()
        if key == 0:
            np.testing.assert_array_equal(np.isnan(w_fast), np.isnan(w_ref))
        else:
            assert np.isfinite(w_ref).all()
        np.testing.assert_allclose(w_fast[others], w_ref[others], rtol=1e-6, atol=1e-7)


# -- the fast model against the plain one ----------------------------------------------------

class _Masks:
    """Dropout with recorded masks: the first model run draws a mask per dropout call (in call
    order) and keeps it; the second run replays them, taking the rows a sparse last layer
    computes (``rows``) where its call has fewer rows than the recorded one."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows, self.recorded, self.replay = rows, [], None
        self.rng = np.random.default_rng(1)

    def start_replay(self) -> None:
        self.replay = iter(self.recorded)

    def __call__(self, block, F, x):
        if not autograd.is_training() or block._rate == 0:
            return x
        if self.replay is None:
            mask = ((self.rng.random(x.shape) >= block._rate) / (1 - block._rate)
                    ).astype(np.float32)
            self.recorded.append(mask)
        else:
            mask = next(self.replay)
            if mask.shape != x.shape:  # (batch [* heads], len, ...) -> the sparse rows
                rows = np.repeat(self.rows, mask.shape[0] // len(self.rows), axis=0)
                mask = mask[np.arange(len(rows))[:, None], rows]
            assert mask.shape == x.shape
        return x * mx.np.array(mask, dtype="float32", ctx=x.ctx)


def _grads(net) -> dict[str, np.ndarray]:
    return {name: p.grad().asnumpy().copy() for name, p in net.canonical_parameters().items()}


@pytest.mark.parametrize("num_layers", [1, 2])
def test_fast_model_equals_plain_model_with_dropout(monkeypatch, num_layers):
    """The fast model's training loss (kernels, sparse last layer) against the plain model's
    (MXNet's own ops, every position): the same losses and gradients with dropout 0.2, both
    seeing the same masks, on uneven valid lengths."""
    config = tiny_config(VOCAB, dropout=0.2, num_layers=num_layers)
    batch = make_batch(VOCAB, 6, LENGTH, seed=4, preds=PREDS)
    args = [bmx.to_mxnet(a) for a in batch]
    rows = np.concatenate([np.zeros((6, 1), np.int32), batch.pred_positions], axis=1)
    masks = _Masks(rows)
    monkeypatch.setattr(gluon.nn.Dropout, "hybrid_forward",
                        lambda block, F, x: masks(block, F, x))
    totals = (mx.np.array(float(batch.mlm_weights.sum())), mx.np.array(6.0))

    plain = build(bmx.MXNetBackend(fast=False), config, [mx.cpu()])
    with autograd.record():
        _, mlm_Y_hat, nsp_Y_hat = plain(*args[:4])
        expected = bert_loss(*output_row_losses(mx.ndarray, mlm_Y_hat, nsp_Y_hat, args[4],
                                                args[5], args[6], VOCAB),
                             mlm_weight_total=totals[0], num_examples=totals[1])
    expected[2].backward()

    masks.start_replay()
    quick = build(bmx.MXNetBackend(fast=True), config, [mx.cpu()])
    quick.hybridize(False)  # imperative, so that the masks can be replayed
    with autograd.record():
        got = fast.PretrainingLoss(quick)(*args, *totals)
    got[2].backward()
    assert masks.recorded and next(masks.replay, None) is None  # every mask used once
    np.testing.assert_allclose([float(x) for x in got], [float(x) for x in expected], rtol=1e-5)
    g_plain, g_fast = _grads(plain), _grads(quick)
    for name, g in g_plain.items():
        atol = max(1e-7, 1e-5 * float(np.abs(g).max()))
        np.testing.assert_allclose(g_fast[name], g, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.parametrize("where", ["word", "pad"])
def test_fast_and_plain_models_propagate_non_finite_embeddings_alike(where):
    """A NaN embedding of a word (at valid positions only) or of ``<pad>`` (after the valid
    lengths: a padded key's value still enters ``0 * NaN``) makes the same examples' outputs
    NaN in both models, at the same places, and leaves the others finite and equal."""
    batch = make_batch(VOCAB, 4, LENGTH, seed=2, preds=PREDS)
    token = int(batch.tokens[0, 1]) if where == "word" else 1
    outputs = {}
    for is_fast in (True, False):
        be = bmx.MXNetBackend(fast=is_fast)
        net = build(be, tiny_config(VOCAB), [mx.cpu()])
        table = net.encoder.token_embedding.weight
        values = table.data().asnumpy()
        values[token] = np.nan
        table.set_data(mx.np.array(values))
        outputs[is_fast] = be.forward(net, batch)
    poisoned = (batch.tokens == token).any(1)
    assert poisoned.any() and not poisoned.all()
    for got, expected in zip(outputs[True], outputs[False]):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        assert all(np.isnan(expected[i]).any() == poisoned[i] for i in range(4))
        np.testing.assert_allclose(got[~poisoned], expected[~poisoned], rtol=1e-4, atol=1e-5)


def test_the_switch_builds_plain_or_fast_models_that_train_alike():
    """MXNetBackend(fast=False): plain ops in every block, imperative; two training steps give
    the fast backend's losses and weights (dropout 0); bf16 needs the fast path."""
    config = tiny_config(VOCAB)
    batches = [make_batch(VOCAB, 8, LENGTH, seed=s, preds=PREDS) for s in range(2)]
    results = {}
    for is_fast in (True, False):
        be = bmx.MXNetBackend(fast=is_fast)
        net = build(be, config, [mx.cpu()])
        ops = {child._ops for child in _blocks(net) if hasattr(child, "_ops")}
        assert ops == {kernels.FAST if is_fast else kernels.PLAIN}
        assert net.fast is is_fast and net._active is is_fast
        assert (fast.loss_graph(net) is not None) is is_fast
        opt = be.create_optimizer(net, OptimizerSettings(lr=1e-3))
        losses = [[float(x) for x in be.train_step(net, opt, b, 1e-3)] for b in batches]
        results[is_fast] = losses, be.state_dict(net)
        if not is_fast:
            with pytest.raises(BackendError, match="fp16.*fast=True"):
                be.check_train_options([mx.gpu(0)], precision="fp16")
            with pytest.raises(ValueError, match="bf16.*fast"):
                step.shard_losses(net, step.split_batch(batches[0], [mx.cpu()]), 1.0,
                                      8, step.PRECISION_PLANS["bf16"])
    np.testing.assert_allclose(results[False][0], results[True][0], rtol=1e-5)
    for name, w in results[True][1].items():
        if name.endswith("attention.W_k.bias"):  # zero gradient but for round-off
            continue
        np.testing.assert_allclose(results[False][1][name], w, rtol=1e-4, atol=2e-5,
                                   err_msg=name)


def _blocks(block):
    yield block
    for child in block._children.values():
        yield from _blocks(child)
