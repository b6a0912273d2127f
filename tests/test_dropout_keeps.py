"""Dropout masks as bool keep masks (the cheap form the torch backend draws ahead) against the
scaled float32 masks (the reference): the same values, and in torch the same losses and
gradients, bit for bit, on the packed fast path and on the plain model."""

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
            assert keep.dtype == bool and keep.shape == scaled_layer[kind].shape
            assert 0 < keep.mean() < 1
            np.testing.assert_array_equal(keep * scale, scaled_layer[kind])
            np.testing.assert_array_equal(
                keep, D.keep_mask(5, 3, D.site_id(layer, kind), 0.3, 2, 7, keep.shape[1:]))


def _loss_and_grads(model, batch, masks):
    import torch

    from bertlite.backends.torch import step as S

    model.zero_grad(set_to_none=True)
    mlm, nsp, loss = S.batch_loss(model, S.to_tensors(batch, torch.device("cpu")), masks=masks)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in S.named_parameters(model) if p.grad is not None}
    return [float(mlm.detach()), float(nsp.detach()), float(loss.detach())], grads


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_torch_bool_keeps_train_like_scaled_masks(fast):
    """The bool masks in ``Keeps`` (scaled where they apply: after gathering on the packed path,
    whole on the plain one) give the losses and gradients of the scaled float32 masks."""
    torch = pytest.importorskip("torch")
    from bertlite.backends.torch import step as S
    from bertlite.backends.torch.kernels import Keeps
    from bertlite.data.loader import load_data_wiki
    from bertlite.params import init_params
    from bertlite.registry import get_backend

    batches, vocab = load_data_wiki(13, 24, corpus="sample", seed=0)
    batch = next(iter(batches))
    assert (np.asarray(batch.valid_lens) < 24).any()  # padding, which the packed path skips
    config = CONFIG.replace(vocab_size=len(vocab))
    be = type(get_backend("torch"))(fast=fast)
    model = be.build_model(config, be.parse_devices(None))
    be.load_state_dict(model, init_params(config, 0))
    model.train()
    device = torch.device("cpu")
    keeps = S._on(device, D.encoder_masks(config, 0, 4, 0, 13, 24, dtype=bool), 0.3)
    scaled = S._on(device, D.encoder_masks(config, 0, 4, 0, 13, 24), 0.3)
    assert all(isinstance(layer, Keeps) for layer in keeps)
    assert not any(isinstance(layer, Keeps) for layer in scaled)
    assert all(layer[k].dtype == torch.bool for layer in keeps for k in layer)
    losses, grads = _loss_and_grads(model, batch, keeps)
    ref_losses, ref_grads = _loss_and_grads(model, batch, scaled)
    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    # and the masks matter: other masks give another loss
    other, _ = _loss_and_grads(model, batch, S._on(
        device, D.encoder_masks(config, 0, 5, 0, 13, 24, dtype=bool), 0.3))
    assert other != losses


def test_torch_keeps_scale_a_whole_mask_for_the_plain_model():
    torch = pytest.importorskip("torch")
    from bertlite.backends.torch.kernels import Keeps, scale_keep

    keep = torch.tensor([[True, False], [False, True]])
    keeps = Keeps({"addnorm1": keep}, D.mask_scale(0.3))
    expected = torch.from_numpy(D.scaled_mask(0, 0, 0, 0.3, 0, 1, 4)).reshape(-1)
    value = float(expected.max())
    assert torch.equal(keeps.get("addnorm1"), torch.tensor([[value, 0.0], [0.0, value]]))
    assert keeps.get("attention") is None and dict(keeps)["addnorm1"] is keep
    assert torch.equal(scale_keep(keeps.get("addnorm1"), None), keeps.get("addnorm1"))
