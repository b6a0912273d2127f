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
