"""The model and training step of every backend, through the Backend interface only."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build, make_batch, tiny_config

from bertlite.errors import DeviceError
from bertlite.loss import bert_loss_numpy
from bertlite.optim import OptimizerSettings
from bertlite.params import init_params, parameter_shapes

#: the shapes of helpers.make_batch() and tiny_config()
VOCAB, BATCH, LENGTH, PREDS = 500, 8, 16, 3


@pytest.fixture
def devices(backend):
    return backend.parse_devices("cpu")


def test_forward_shapes(backend, devices):
    model = build(backend, devices=devices)
    encoded, mlm, nsp = backend.forward(model, make_batch())
    assert encoded.shape == (BATCH, LENGTH, 32)
    assert mlm.shape == (BATCH, PREDS, VOCAB)
    assert nsp.shape == (BATCH, 2)
    assert all(np.isfinite(a).all() for a in (encoded, mlm, nsp))
    b = make_batch()
    assert backend.encode(model, b.tokens, b.segments, b.valid_lens).shape == encoded.shape


def test_padding_beyond_valid_len_is_not_attended(backend, devices):
    model = build(backend, devices=devices)
    batch = make_batch()
    changed = batch.tokens.copy()
    for i, n in enumerate(batch.valid_lens.astype(int)):
        changed[i, n:] = np.arange(7, 7 + LENGTH - n)
    before = backend.forward(model, batch)[0]
    after = backend.forward(model, batch._replace(tokens=changed))[0]
    for i, n in enumerate(batch.valid_lens.astype(int)):
        np.testing.assert_allclose(after[i, :n], before[i, :n], atol=1e-5)
    assert not np.allclose(after[1:], before[1:])  # the padded positions themselves changed


def test_padded_prediction_slots_do_not_change_the_loss(backend, devices):
    model = build(backend, devices=devices)
    batch = make_batch()
    unused = batch.mlm_weights == 0
    assert unused.any()
    positions = np.where(unused, LENGTH - 2, batch.pred_positions).astype(np.int32)
    labels = np.where(unused, 7, batch.mlm_labels).astype(np.int32)
    mlm, nsp, grads = backend.loss_and_grads(model, batch)
    mlm2, nsp2, grads2 = backend.loss_and_grads(
        model, batch._replace(pred_positions=positions, mlm_labels=labels))
    assert mlm2 == pytest.approx(mlm, rel=1e-6)
    assert nsp2 == pytest.approx(nsp, rel=1e-6)
    for name in grads:
        np.testing.assert_allclose(grads2[name], grads[name], rtol=1e-4, atol=1e-7)


def test_loss_matches_the_core_formula(backend, devices):
    model = build(backend, devices=devices)
    batch = make_batch()
    _, mlm_logits, nsp_logits = backend.forward(model, batch)
    expected = bert_loss_numpy(mlm_logits, batch.mlm_labels, batch.mlm_weights, nsp_logits,
                               batch.nsp_labels)
    mlm, nsp, grads = backend.loss_and_grads(model, batch)
    assert mlm == pytest.approx(expected[0], rel=1e-5)
    assert nsp == pytest.approx(expected[1], rel=1e-5)
    assert set(grads) == set(parameter_shapes(tiny_config()))
    assert all(g.shape == parameter_shapes(tiny_config())[n] for n, g in grads.items())


def test_state_dict_round_trip(backend, devices):
    config = tiny_config()
    expected = init_params(config, seed=3)
    model = backend.build_model(config, devices)
    backend.load_state_dict(model, expected)
    state = backend.state_dict(model)
    assert set(state) == set(parameter_shapes(config))
    for name, value in expected.items():
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], value)
    # The arrays are a snapshot: training on does not change them.
    optimizer = backend.create_optimizer(model, OptimizerSettings(lr=0.01))
    backend.train_step(model, optimizer, make_batch(), 0.01)
    np.testing.assert_array_equal(state["mlm.decoder.weight"], expected["mlm.decoder.weight"])
    assert not np.array_equal(backend.state_dict(model)["mlm.decoder.weight"],
                              expected["mlm.decoder.weight"])


def test_load_state_dict_rejects_wrong_parameters(backend, devices):
    model = backend.build_model(tiny_config(), devices)
    arrays = init_params(tiny_config())
    arrays["hidden.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="hidden.weight"):
        backend.load_state_dict(model, arrays)


def test_positional_embedding_is_trained(backend, devices):
    model = build(backend, devices=devices)
    _, _, grads = backend.loss_and_grads(model, make_batch())
    pos = grads["encoder.pos_embedding"]
    assert np.abs(pos[0, :LENGTH]).sum() > 0
    assert np.abs(pos[0, LENGTH:]).sum() == 0  # positions never seen get no gradient


def test_train_steps_lower_the_loss(backend, devices):
    model = build(backend, devices=devices)
    optimizer = backend.create_optimizer(model, OptimizerSettings(lr=0.01))
    batch = make_batch()
    first = backend.loss_and_grads(model, batch)
    losses = [tuple(float(x) for x in backend.train_step(model, optimizer, batch, 0.01))
              for _ in range(5)]
    last = backend.loss_and_grads(model, batch)
    assert losses[0] == pytest.approx(first[:2], rel=1e-4)  # dropout 0: the same loss
    assert last[0] + last[1] < 0.8 * (first[0] + first[1])


def test_optimizer_state_round_trip(backend, devices):
    settings = OptimizerSettings(lr=0.01, optimizer="adamw", weight_decay=0.01)
    batch, other = make_batch(seed=0), make_batch(seed=1)
    model = build(backend, devices=devices)
    optimizer = backend.create_optimizer(model, settings)
    fresh = backend.optimizer_state(optimizer)
    assert int(fresh["step"]) == 0
    for _ in range(2):
        backend.train_step(model, optimizer, batch, 0.01)
    state = backend.optimizer_state(optimizer)
    assert int(state["step"]) == 2
    names = parameter_shapes(tiny_config())
    assert set(state) == {"step"} | {f"{n}.{k}" for n in names for k in ("exp_avg", "exp_avg_sq")}
    assert np.abs(state["mlm.decoder.weight.exp_avg_sq"]).sum() > 0

    # A second model and optimizer restored from the arrays take the very same next step.
    twin = backend.build_model(tiny_config(), devices)
    backend.load_state_dict(twin, backend.state_dict(model))
    twin_optimizer = backend.create_optimizer(twin, settings)
    backend.load_optimizer_state(twin_optimizer, state)
    restored = backend.optimizer_state(twin_optimizer)
    for key, value in state.items():
        np.testing.assert_array_equal(restored[key], value)
    backend.train_step(model, optimizer, other, 0.005)
    backend.train_step(twin, twin_optimizer, other, 0.005)
    ours, theirs = backend.state_dict(model), backend.state_dict(twin)
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-6, atol=1e-7)


def test_dropout_is_reproducible_from_the_seed(backend, devices):
    config = tiny_config(dropout=0.3)
    batch = make_batch()

    def one_step(seed, step=0):
        model = build(backend, config, devices)
        optimizer = backend.create_optimizer(model, OptimizerSettings(lr=0.01))
        # the masks are keyed by (run seed, step), as the trainer passes them
        return [float(x) for x in backend.train_step(model, optimizer, batch, 0.01, seed=seed,
                                                     step=step)]

    assert one_step(5) == one_step(5)
    assert one_step(5) != one_step(6)
    assert one_step(5) != one_step(5, step=1)


def test_unknown_devices_raise_device_error(backend):
    for spec in ("tpu", "gpu:99", "cpu:zero"):
        with pytest.raises(DeviceError):
            backend.parse_devices(spec)
