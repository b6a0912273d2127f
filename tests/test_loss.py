"""The loss seam: the core's formula (:func:`bertlite.loss.bert_loss`) on per-row values, without
a framework; and every backend's loss as that formula applied to the backend's own per-row
cross-entropies (:class:`bertlite.loss.RowLosses`), on both of its paths, with padded
prediction slots (weight 0) and uneven valid lengths."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build, make_batch, tiny_config

from bertlite import sharding
from bertlite.loss import RowLosses, bert_loss, bert_loss_numpy, cross_entropy_numpy

VOCAB, ROWS, LENGTH, PREDS = 97, 6, 12, 3


def _numpy_rows(seed: int = 0, n: int = 10, m: int = 4) -> RowLosses:
    rng = np.random.default_rng(seed)
    weights = (rng.random(n) < 0.6).astype(np.float64)
    weights[0] = 1.0
    return RowLosses(rng.uniform(0.1, 9.0, n), weights, rng.uniform(0.1, 2.0, m))


class _Values:
    """A 1-d array type with nothing but ``*``, ``/`` and ``sum()`` (no shape, no numpy
    behind it): what the core may rely on, as an MXNet symbol gives it."""

    def __init__(self, values) -> None:
        self.values = [float(v) for v in np.atleast_1d(values)]

    def _other(self, other):
        return other.values if isinstance(other, _Values) else [float(other)] * len(self.values)

    def __mul__(self, other):
        return _Values([a * b for a, b in zip(self.values, self._other(other))])

    def __truediv__(self, other):
        return _Values([a / b for a, b in zip(self.values, self._other(other))])

    def __add__(self, other):
        return _Values([a + b for a, b in zip(self.values, self._other(other))])

    def sum(self):
        return _Values(sum(self.values))


def test_core_formula_is_the_weighted_mean_of_mlm_rows_and_the_mean_of_nsp_rows():
    rows = _numpy_rows()
    mlm, nsp, total = bert_loss(*rows)
    assert rows.mlm_weights.min() == 0  # padded slots among the rows
    assert float(mlm) == pytest.approx(np.average(rows.mlm, weights=rows.mlm_weights), rel=1e-7)
    assert float(nsp) == pytest.approx(np.mean(rows.nsp), rel=1e-12)
    assert float(total) == float(mlm) + float(nsp)
    # a padded slot's value never counts, however large
    changed = rows.mlm.copy()
    changed[rows.mlm_weights == 0] = 1e6
    assert bert_loss(changed, rows.mlm_weights, rows.nsp)[0] == mlm


def test_core_formula_needs_only_multiply_divide_and_sum():
    """An array type without shape or numpy gives the numpy result: the seam asks nothing
    else of a backend's arrays (normalizers passed, as a graph passes them)."""
    rows = _numpy_rows(seed=3)
    expected = bert_loss(*rows)
    got = bert_loss(*(_Values(r) for r in rows), mlm_weight_total=rows.mlm_weights.sum(),
                    num_examples=len(rows.nsp))
    assert [g.values[0] for g in got] == pytest.approx([float(e) for e in expected], rel=1e-12)


def test_pieces_with_the_whole_batch_normalizers_add_up_to_the_batch_loss():
    rows = _numpy_rows(seed=1, n=12, m=6)
    whole = bert_loss(*rows)
    totals = {"mlm_weight_total": rows.mlm_weights.sum(), "num_examples": len(rows.nsp)}
    pieces = [bert_loss(rows.mlm[a:b], rows.mlm_weights[a:b], rows.nsp[c:d], **totals)
              for (a, b), (c, d) in (((0, 5), (0, 2)), ((5, 6), (2, 3)), ((6, 12), (3, 6)))]
    for k in range(3):
        assert sum(float(p[k]) for p in pieces) == pytest.approx(float(whole[k]), rel=1e-12)


def test_core_formula_without_predicted_positions_gives_zero_mlm_loss():
    mlm, nsp, _ = bert_loss(np.zeros(0), np.zeros(0), np.array([0.5, 1.5]))
    assert float(mlm) == 0.0 and float(nsp) == 1.0


@pytest.mark.parametrize("shapes", [((4,), (4, 1), (2,)), ((4, 1), (4,), (2,)),
                                    ((4,), (3,), (2,)), ((4,), (4,), (2, 2))])
def test_core_formula_rejects_values_that_would_broadcast(shapes):
    """The book's PyTorch tab multiplied ``(n,)`` by ``(n, 1)`` into an ``n x n`` matrix."""
    mlm, weights, nsp = (np.ones(s) for s in shapes)
    with pytest.raises(ValueError, match="1-d|one value per prediction slot"):
        bert_loss(mlm, weights, nsp)


def test_numpy_reference_is_the_core_formula_of_numpy_cross_entropies():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(3, 2, 7)) * 4, rng.integers(0, 7, (3, 2))
    weights = np.array([[1, 0], [1, 1], [1, 0]], np.float32)
    nsp_logits, nsp_labels = rng.normal(size=(3, 2)), rng.integers(0, 2, 3)
    # the cross-entropy against the log of the softmax, written out
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ce = -np.log(np.take_along_axis(probs, labels[..., None], -1)[..., 0])
    np.testing.assert_allclose(cross_entropy_numpy(logits.reshape(-1, 7), labels), ce.reshape(-1),
                               rtol=1e-12)
    got = bert_loss_numpy(logits, labels, weights, nsp_logits, nsp_labels)
    expected = bert_loss(ce.reshape(-1), weights.reshape(-1).astype(np.float64),
                         cross_entropy_numpy(nsp_logits, nsp_labels))
    assert got == pytest.approx([float(e) for e in expected], rel=1e-12)


# -- every backend: its loss is the core formula of its own rows ---------------------------------

def _formula(rows: RowLosses, totals: sharding.Normalizers) -> list[float]:
    """The core formula in float64 on a backend's rows (as numpy)."""
    values = [np.asarray(r, dtype=np.float64) for r in rows]
    return [float(x) for x in bert_loss(*values, mlm_weight_total=totals.mlm_weight_total,
                                        num_examples=totals.num_examples)]


def _rows(batch, piece: slice):
    return type(batch)(*(np.asarray(a)[piece] for a in batch))


def _torch_case(fast: bool, batch, totals, piece: slice):
    import torch

    from bertlite.backends.torch import TorchBackend
    from bertlite.backends.torch import loss as torch_loss
    from bertlite.backends.torch.step import to_tensors

    model = build(TorchBackend(fast=fast), tiny_config(VOCAB))
    with torch.no_grad():  # the logits of every slot: the plain forward (eval mode)
        _, mlm_logits, nsp_logits = model.eval()(*to_tensors(batch, "cpu")[:4])
    model.train()  # dropout 0: the training path (the packed one, when fast), no draws
    part = to_tensors(_rows(batch, piece), "cpu")
    rows = torch_loss.row_losses(model, part)
    loss = torch_loss.batch_loss(model, part, mlm_weight_total=totals.mlm_weight_total,
                                 num_examples=totals.num_examples)
    as_numpy = RowLosses(*(r.detach().numpy() for r in rows))
    return as_numpy, [float(x.detach()) for x in loss], mlm_logits[piece].numpy(), \
        nsp_logits[piece].numpy()


def _mxnet_case(fast: bool, batch, totals, piece: slice):
    import mxnet as mx

    from bertlite.backends.mxnet import MXNetBackend, to_mxnet
    from bertlite.backends.mxnet import fast as mx_fast
    from bertlite.backends.mxnet import loss as mx_loss

    net = build(MXNetBackend(fast=fast), tiny_config(VOCAB), [mx.cpu()])
    _, mlm_logits, nsp_logits = net(*(to_mxnet(a) for a in batch[:4]))
    shard = [to_mxnet(a) for a in _rows(batch, piece)]
    total = mx.np.array(totals.mlm_weight_total, dtype="float32")
    graph = mx_fast.loss_graph(net)
    assert (graph is not None) is fast
    with mx.autograd.record():  # the training path (its graph is the one with gradients)
        loss = mx_loss.shard_loss(net, graph, shard, total, totals.num_examples, VOCAB)
    if fast:  # the graph's own rows, computed imperatively by the same function
        net.hybridize(False)
        tokens, segments, valid_lens, positions, weights, labels, nsp_labels = shard
        mlm_Y_hat, nsp_Y_hat = mx_fast.sparse_forward(net, mx.ndarray, tokens, segments,
                                                      valid_lens.reshape(-1), positions)
        rows = mx_loss.output_row_losses(mx.ndarray, mlm_Y_hat, nsp_Y_hat, weights, labels,
                                         nsp_labels, VOCAB)
    else:
        rows = mx_loss.row_losses(net, shard, VOCAB)
    as_numpy = RowLosses(*(r.asnumpy() for r in rows))
    return as_numpy, [float(x) for x in loss], mlm_logits.asnumpy()[piece], \
        nsp_logits.asnumpy()[piece]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("piece", [slice(0, ROWS), slice(1, 4)], ids=["batch", "piece"])
def test_backend_loss_is_the_core_formula_of_its_own_rows(backend_name, fast, piece):
    """The backend's training loss (a whole batch, or a piece of it with the whole batch's
    normalizers) equals the core formula in float64 applied to the per-row values the backend
    hands over; those rows are the cross-entropies of the model's logits, one per prediction
    slot with its weight (the torch fast path: only the slots of non-zero weight) and one
    per example."""
    batch = make_batch(VOCAB, ROWS, LENGTH, seed=5, preds=PREDS, fill=0.5)
    assert len(set(batch.valid_lens.tolist())) > 2 and (batch.mlm_weights == 0).any()
    totals = sharding.normalizers(batch.mlm_weights)
    case = {"torch": _torch_case, "mxnet": _mxnet_case}[backend_name]
    rows, loss, mlm_logits, nsp_logits = case(fast, batch, totals, piece)

    assert all(r.ndim == 1 for r in rows) and rows.mlm.shape == rows.mlm_weights.shape
    np.testing.assert_allclose(loss, _formula(rows, totals), rtol=2e-6)
    # the rows themselves: the cross-entropies of the model's own logits
    weights = batch.mlm_weights[piece].reshape(-1)
    reference = cross_entropy_numpy(mlm_logits.reshape(-1, VOCAB), batch.mlm_labels[piece])
    slots = weights != 0 if (backend_name, fast) == ("torch", True) else slice(None)
    np.testing.assert_array_equal(rows.mlm_weights, weights[slots])
    np.testing.assert_allclose(rows.mlm, reference[slots], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows.nsp, cross_entropy_numpy(nsp_logits, batch.nsp_labels[piece]),
                               rtol=1e-4, atol=1e-6)
