"""Dropout masks drawn where they are read (the torch backend's ``kernels.LayerMasks``)
against the whole masks of the core (the reference): the same elements, and in torch the same
losses and gradients, bit for bit, on the packed fast path (which draws only the valid tokens'
elements and each attention group's keys) and on the plain model (which draws whole masks)."""

from __future__ import annotations

import numpy as np
import pytest

from bertlite import dropout as D
from bertlite.config import BERTConfig

CONFIG = BERTConfig(vocab_size=60, num_hiddens=16, ffn_num_hiddens=32, num_heads=2,
                    num_layers=2, dropout=0.3)


def test_bool_encoder_masks_are_the_scaled_masks_unscaled():
    keeps = D.encoder_masks(CONFIG, 5, 3, 2, 7, 9, dtype=bool)
    scaled = D.encoder_masks(CONFIG, 5, 3, 2, 7, 9)
    scale = np.float32(D.mask_scale(CONFIG.dropout))
    assert scale == np.float32(1 / D.keep_probability(0.3))
    assert len(keeps) == len(scaled) == CONFIG.num_layers
    for layer, (keep_layer, scaled_layer) in enumerate(zip(keeps, scaled)):
        assert list(keep_layer) == list(scaled_layer) == list(D.SITE_KINDS)
        for kind, keep in keep_layer.items():
            np.testing.assert_array_equal(
                keep, D.keep_mask(5, 3, D.site_id(layer, kind), 0.3, 2, 7, keep.shape[1:]))
            assert keep.dtype == bool and keep.shape == scaled_layer[kind].shape
            assert keep.shape[1:] == D.site_shapes(CONFIG, 9)[kind]
            assert 0 < keep.mean() < 1
            np.testing.assert_array_equal(keep * scale, scaled_layer[kind])


def test_layer_masks_give_the_whole_masks_elements():
    torch = pytest.importorskip("torch")
    from bertlite.backends.torch.kernels import LayerMasks

    row_start, rows, length = 3, 5, 7
    whole = D.encoder_masks(CONFIG, 9, 4, row_start, rows, length)
    for layer in range(CONFIG.num_layers):
        masks = LayerMasks(CONFIG, 9, 4, layer, row_start, rows, length)
        for kind in D.SITE_KINDS:
            got = masks.get(kind)
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.from_numpy(whole[layer][kind]))
        # the add & norm rows of some positions (example * length + position, in the piece)
        padded_rows = torch.tensor([0, 1, 8, 34, 20, 6])
        ref = whole[layer]["addnorm2"].reshape(-1, CONFIG.num_hiddens)[padded_rows.numpy()]
        assert torch.equal(masks.rows("addnorm2", padded_rows), torch.from_numpy(ref))
        # an attention group: its examples' first keys at the first queries ...
        members = torch.tensor([4, 0, 2])
        ref = whole[layer]["attention"][members.numpy()][:, :, :5, :5]
        assert torch.equal(masks.attention(members, None, 5),
                           torch.from_numpy(ref.reshape(-1, 5, 5)))
        # ... or at chosen query positions, per example
        positions = torch.tensor([[0, 3], [6, 6], [2, 0]])
        full = whole[layer]["attention"]
        ref = np.stack([full[m][:, positions[i].numpy(), :4]
                        for i, m in enumerate(members.numpy())])
        assert torch.equal(masks.attention(members, positions, 4),
                           torch.from_numpy(ref.reshape(-1, 2, 4)))


def test_whole_masks_for_data_parallel_are_the_cores():
    """``nn.DataParallel`` scatters its inputs over its GPUs along the batch: it gets the whole
    masks by site as tensors (what ``step._full`` makes of the layers' masks)."""
    torch = pytest.importorskip("torch")
    from bertlite.backends.torch import step as S

    class Model:
        config = CONFIG

    layers = S.dropout_masks(Model(), 3, 8, slice(4, 10), 9, torch.device("cpu"))
    whole = D.encoder_masks(CONFIG, 3, 8, 4, 6, 9)
    full = S._full(layers)
    assert len(full) == CONFIG.num_layers
    for got, ref in zip(full, whole):
        assert list(got) == list(ref) == list(D.SITE_KINDS)
        for kind in D.SITE_KINDS:
            assert torch.equal(got[kind], torch.from_numpy(ref[kind]))
    assert S.dropout_masks(type("M", (), {"config": CONFIG.replace(dropout=0.0)})(), 3, 8,
                           slice(4, 10), 9, torch.device("cpu")) == []


def _loss_and_grads(model, batch, masks):
    import torch

    from bertlite.backends.torch import step as S

    model.zero_grad(set_to_none=True)
    mlm, nsp, loss = S.batch_loss(model, S.to_tensors(batch, torch.device("cpu")), masks=masks)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in S.named_parameters(model) if p.grad is not None}
    return [float(mlm.detach()), float(nsp.detach()), float(loss.detach())], grads


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_masks_drawn_where_read_train_like_whole_masks(fast):
    """The packed path's masks drawn where read (and the plain model's whole ones, drawn by
    the same object) give the losses and gradients of the core's whole scaled masks: bit for
    bit, the sparse last layer and the attention groups included."""
    torch = pytest.importorskip("torch")
    from bertlite.backends.torch import step as S
    from bertlite.data.loader import load_data_wiki
    from bertlite.params import init_params
    from bertlite.registry import get_backend

    batches, vocab = load_data_wiki(96, 64, corpus="sample", seed=0)
    batch = next(iter(batches))
    lens = np.asarray(batch.valid_lens)
    assert (lens < 64).any() and len(set(lens.tolist())) > 3  # padding, groups of lengths
    config = CONFIG.replace(vocab_size=len(vocab))
    be = type(get_backend("torch"))(fast=fast)
    model = be.build_model(config, be.parse_devices(None))
    be.load_state_dict(model, init_params(config, 0))
    model.train()
    device = torch.device("cpu")
    where_read = S.dropout_masks(model, 0, 4, slice(0, 96), 64, device)
    whole = [{kind: torch.from_numpy(m) for kind, m in layer.items()}
             for layer in D.encoder_masks(config, 0, 4, 0, 96, 64)]
    losses, grads = _loss_and_grads(model, batch, where_read)
    ref_losses, ref_grads = _loss_and_grads(model, batch, whole)
    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    # and the masks matter: another step's masks give another loss
    other, _ = _loss_and_grads(model, batch, S.dropout_masks(model, 0, 5, slice(0, 96), 64,
                                                             device))
    assert other != losses
    if fast:  # the packed path gathers fewer elements than the whole masks hold
        from bertlite.backends.torch import fast as FP

        packing = FP.pack(torch.as_tensor(lens), 96, 64)
        assert len(packing.groups) > 1 and packing.padded_rows.numel() < 96 * 64


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_mxnet_masks_drawn_where_read_train_like_whole_masks(fast):
    """MXNet's graph takes whole masks; it draws only the rows that reach the loss (valid
    positions; the sparse last layer's rows) and leaves the rest 0. Against the core's whole
    masks (taken at the sparse rows by ``fast.sparse_masks``): the same losses and gradients,
    bit for bit, on uneven valid lengths."""
    mx = pytest.importorskip("mxnet")
    from mxnet import autograd

    from bertlite import sharding
    from bertlite.backends.mxnet import fast as FP
    from bertlite.backends.mxnet import step as S
    from bertlite.backends.mxnet.backend import MXNetBackend
    from bertlite.backends.mxnet.model import flat_masks
    from bertlite.data.loader import load_data_wiki
    from bertlite.params import init_params

    batches, vocab = load_data_wiki(48, 64, corpus="sample", seed=0)
    batch = next(iter(batches))
    assert (np.asarray(batch.valid_lens) < 64).any()
    config = CONFIG.replace(vocab_size=len(vocab))
    be = MXNetBackend(fast=fast)
    net = be.build_model(config, be.parse_devices("cpu"))
    be.load_state_dict(net, init_params(config, 0))
    sparse = FP.loss_graph(net, None, True) is not None
    assert sparse is fast
    positions = batch.pred_positions if sparse else None
    where_read = FP.shard_masks(net, 0, 4, [slice(0, 48)], 64, positions, batch.valid_lens)
    whole = [flat_masks(D.encoder_masks(config, 0, 4, 0, 48, 64))]
    if sparse:
        whole = [FP.sparse_masks(whole[0], batch.pred_positions)]
    assert [m.shape for m in where_read[0]] == [m.shape for m in whole[0]]
    assert any(not np.array_equal(a, b) for a, b in zip(where_read[0], whole[0]))
    mlm_total, num_examples = sharding.normalizers(batch.mlm_weights)

    def loss_and_grads(masks):
        shards = S.split_batch(batch, [mx.cpu()])
        with autograd.record():
            mlm, nsp, ls = S.shard_losses(net, shards, mlm_total, num_examples, masks=masks)
        ls[0].backward()
        return ([float(mlm[0]), float(nsp[0])],
                {n: p.grad().asnumpy().copy() for n, p in net.canonical_parameters().items()})

    losses, grads = loss_and_grads(where_read)
    ref_losses, ref_grads = loss_and_grads(whole)
    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        np.testing.assert_array_equal(grad, ref_grads[name], err_msg=name)
