"""The architecture options (activation, embedding LayerNorm, LayerNorm epsilon, tied decoder)
and the two flavours: the config, the parameter layout, checkpoints, and in each backend the
fast path against the plain model for every combination of the options."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from helpers import build, make_batch, tiny_config

from bertlite.config import FLAVORS, PRESETS, BERTConfig, resolve_config
from bertlite.params import init_params, parameter_shapes

#: every combination of the four options
COMBOS = [dict(activation=a, embedding_norm=n, layer_norm_eps=e, tie_decoder=t)
          for a, n, e, t in itertools.product(("relu", "gelu"), (False, True), (1e-5, 1e-12),
                                              (False, True))]


def combo_id(options: dict) -> str:
    return "-".join([options["activation"], "embnorm" if options["embedding_norm"] else "noemb",
                     f"eps{options['layer_norm_eps']:g}",
                     "tied" if options["tie_decoder"] else "untied"])


# -- the config (no framework) ------------------------------------------------------------------

def test_default_is_the_books_flavour_and_presets_carry_theirs():
    assert BERTConfig(vocab_size=10).flavor == "book"
    assert BERTConfig.from_preset("tiny", 10) == BERTConfig(vocab_size=10, **PRESETS["tiny"])
    base = BERTConfig.from_preset("bert-base", 30522)
    assert base.flavor == "bert"
    assert (base.num_layers, base.num_hiddens, base.num_heads, base.ffn_num_hiddens,
            base.max_len) == (12, 768, 12, 3072, 512)
    assert base.num_parameters() == sum(int(np.prod(s))
                                        for s in parameter_shapes(base).values())
    # BertForPreTraining of bert-base-uncased: 110,106,428 parameters (decoder tied)
    assert base.num_parameters() == 110_106_428
    assert BERTConfig.from_preset("bert-tiny", 10).num_heads == 2
    assert BERTConfig.from_preset("tiny", 10, flavor="bert").flavor == "bert"
    mixed = BERTConfig(vocab_size=10, activation="gelu")
    assert mixed.flavor is None


@pytest.mark.parametrize("changes, needle", [
    (dict(activation="tanh"), "activation"),
    (dict(embedding_norm=1), "embedding_norm"),
    (dict(tie_decoder="yes"), "tie_decoder"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(layer_norm_eps=True), "layer_norm_eps"),
])
def test_bad_options_are_refused(changes, needle):
    with pytest.raises(ValueError, match=needle):
        BERTConfig(vocab_size=10, **changes)


def test_unknown_flavor_is_refused():
    with pytest.raises(ValueError, match="unknown flavor 'gpt'.*bert"):
        BERTConfig.from_preset("tiny", 10, flavor="gpt")


def test_layout_follows_the_options():
    plain = parameter_shapes(tiny_config())
    bert = parameter_shapes(tiny_config(**FLAVORS["bert"]))
    assert set(bert) - set(plain) == {"encoder.ln.weight", "encoder.ln.bias"}
    assert set(plain) - set(bert) == {"mlm.decoder.weight"}
    params = init_params(tiny_config(**FLAVORS["bert"]))
    np.testing.assert_array_equal(params["encoder.ln.weight"], 1.0)
    np.testing.assert_array_equal(params["encoder.ln.bias"], 0.0)


def test_old_configs_read_as_the_books_flavour():
    old = {k: v for k, v in tiny_config().to_dict().items() if k not in FLAVORS["book"]}
    assert BERTConfig.from_dict(old).flavor == "book"
    config = resolve_config({**FLAVORS["bert"], "num_hiddens": 32, "num_heads": 2}, 50)
    assert BERTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- in each backend -----------------------------------------------------------------------------

@pytest.mark.parametrize("options", COMBOS, ids=combo_id)
def test_fast_path_equals_plain_model(backend, options):
    """The backend's fast path (kernels, fused activation, sparse last layer) gives the plain
    model's outputs and gradients for every combination of the options."""
    try:
        plain_backend = type(backend)(fast=False)
    except TypeError:
        pytest.skip(f"{type(backend).__name__} has no plain model to compare with")
    config = tiny_config(**options)
    batch = make_batch(config.vocab_size)
    fast, plain = build(backend, config), build(plain_backend, config)
    for a, b in zip(backend.forward(fast, batch), plain_backend.forward(plain, batch)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
    f_mlm, f_nsp, f_grads = backend.loss_and_grads(fast, batch)
    p_mlm, p_nsp, p_grads = plain_backend.loss_and_grads(plain, batch)
    assert (f_mlm, f_nsp) == pytest.approx((p_mlm, p_nsp), rel=1e-5)
    assert set(f_grads) == set(p_grads) == set(parameter_shapes(config))
    for name in f_grads:
        scale = max(1e-3, float(np.abs(p_grads[name]).max()))
        np.testing.assert_allclose(f_grads[name], p_grads[name], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=name)


def test_each_option_changes_the_model(backend):
    """Every option reaches the computation (the same weights give other outputs)."""
    batch = make_batch(500)
    base = tiny_config()
    reference = backend.forward(build(backend, base), batch)
    for changes in (dict(activation="gelu"), dict(embedding_norm=True),
                    dict(layer_norm_eps=0.5)):
        outputs = backend.forward(build(backend, base.replace(**changes)), batch)
        assert not np.allclose(outputs[0], reference[0], atol=1e-4), changes
    tied = build(backend, base.replace(tie_decoder=True))
    state = backend.state_dict(tied)
    assert "mlm.decoder.weight" not in state
    mlm = backend.forward(tied, batch)[1]
    # the decoder reads the token embedding: changing it moves the MLM logits
    state["encoder.token_embedding.weight"] = state["encoder.token_embedding.weight"] * 2
    backend.load_state_dict(tied, state)
    assert not np.allclose(backend.forward(tied, batch)[1], mlm, atol=1e-4)


# -- the torch backend's packed training path --------------------------------------------------

def _torch_fast():
    from conftest import skip_unless_backend

    skip_unless_backend("torch")
    from bertlite.backends.torch import fast, kernels

    if not kernels.FUSED_LINEAR:
        pytest.skip("this torch build has no oneDNN fused linear: no fast path")
    return fast, kernels


@pytest.mark.parametrize("options", COMBOS, ids=combo_id)
def test_torch_packed_training_path_equals_plain(options):
    """Training mode on the CPU packs the valid tokens and runs the fused kernels (GELU variant
    included): the same losses and gradients as the plain model, for every combination."""
    fast, _ = _torch_fast()
    import torch

    from bertlite.backends.torch import step as torch_step
    from bertlite.backends.torch.model import BERTModel

    config = tiny_config(vocab_size=200, **options)
    batch = make_batch(200, batch=16, length=12, seed=3, preds=3)
    tensors = torch_step.to_tensors(batch, torch.device("cpu"))
    results = []
    for on in (True, False):
        model = BERTModel.from_config(config, seed=0, fast=on).train()
        assert fast.packs(model, tensors.tokens, tensors.valid_lens) == on
        losses = torch_step.batch_loss(model, tensors)
        losses[2].backward()
        results.append(([float(x.detach()) for x in losses],
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_losses, fast_grads), (plain_losses, plain_grads) = results
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    assert set(fast_grads) == set(parameter_shapes(config))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_gelu_kernels_equal_their_plain_twins():
    _, kernels = _torch_fast()
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=gen, requires_grad=True)
    w1, b1 = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    w2, b2 = torch.randn(16, 24, generator=gen), torch.randn(16, generator=gen)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    grad_out = torch.randn(37, 16, generator=gen)
    for fused, plain in (
            (lambda: kernels.linear(x, w1, b1, activation="gelu") @ w2.t(),
             lambda: kernels.linear_reference(x, w1, b1, activation="gelu") @ w2.t()),
            (lambda: kernels.FFN.apply(x, w1, b1, w2, b2, "gelu"),
             lambda: kernels.ffn_reference(x, w1, b1, w2, b2, "gelu"))):
        outs = []
        for fn in (fused, plain):
            y = fn()
            grads = torch.autograd.grad(y, [x, *params], grad_out, allow_unused=True)
            outs.append((y.detach(), grads))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(outs[0][1], outs[1][1]):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # GELU is the exact erf form: gelu(1) = Phi(1)
    one = kernels.linear(torch.ones(1, 1), torch.ones(1, 1), None, activation="gelu")
    assert float(one) == pytest.approx(0.8413447460685429, abs=1e-6)
    with pytest.raises(ValueError, match="activation must be"):
        kernels.linear(x, w1, b1, activation="tanh")


# -- across the frameworks --------------------------------------------------------------------

@pytest.mark.parametrize("options", COMBOS, ids=combo_id)
def test_both_backends_give_the_same_outputs_and_gradients(options):
    """The same weights and batch in PyTorch and MXNet: outputs within 1e-5, gradients within
    1e-4, for every combination of the options (each backend's default, fast path)."""
    import bertlite
    from conftest import skip_unless_backend

    skip_unless_backend("torch")
    skip_unless_backend("mxnet")
    torch_be, mx_be = bertlite.get_backend("torch"), bertlite.get_backend("mxnet")
    config = tiny_config(vocab_size=300, **options)
    batch = make_batch(config.vocab_size, batch=7, length=20, seed=2, preds=4)
    t_net, m_net = build(torch_be, config), build(mx_be, config)
    for t_out, m_out in zip(torch_be.forward(t_net, batch), mx_be.forward(m_net, batch)):
        np.testing.assert_allclose(m_out, t_out, rtol=1e-5, atol=2e-5)
    t_mlm, t_nsp, t_grads = torch_be.loss_and_grads(t_net, batch)
    m_mlm, m_nsp, m_grads = mx_be.loss_and_grads(m_net, batch)
    assert (m_mlm, m_nsp) == pytest.approx((t_mlm, t_nsp), rel=1e-5)
    assert set(t_grads) == set(m_grads) == set(parameter_shapes(config))
    for name in t_grads:
        scale = max(1e-3, float(np.abs(t_grads[name]).max()))
        np.testing.assert_allclose(m_grads[name], t_grads[name], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=name)
