"""One model, two frameworks: the same weights and batch give the same numbers in PyTorch and
MXNet (one device and per-shard), and the same training steps give the same curve."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import build, make_batch

import bertlite
from bertlite.config import BERTConfig
from bertlite.optim import OptimizerSettings
from bertlite.params import init_params
from conftest import skip_unless_backend


@pytest.fixture(scope="module")
def both():
    skip_unless_backend("torch")
    skip_unless_backend("mxnet")
    return bertlite.get_backend("torch"), bertlite.get_backend("mxnet")


CONFIGS = {
    "tiny": BERTConfig.from_preset("tiny", 300, dropout=0.0, max_len=64),
    "4-layer": BERTConfig(vocab_size=300, num_hiddens=64, ffn_num_hiddens=96, num_heads=4,
                          num_layers=4, dropout=0.0, max_len=64),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mx_devices", [None, "cpu:0,cpu:1"], ids=["mx-1dev", "mx-2shards"])
def test_same_weights_same_outputs_losses_and_gradients(both, name, mx_devices):
    torch_be, mx_be = both
    config = CONFIGS[name]
    batch = make_batch(config.vocab_size, batch=7, length=24, preds=4)
    t_net, m_net = build(torch_be, config), build(mx_be, config, mx_devices)
    for t_out, m_out in zip(torch_be.forward(t_net, batch), mx_be.forward(m_net, batch)):
        np.testing.assert_allclose(m_out, t_out, rtol=1e-5, atol=2e-5)
    t_mlm, t_nsp, t_grads = torch_be.loss_and_grads(t_net, batch)
    m_mlm, m_nsp, m_grads = mx_be.loss_and_grads(m_net, batch)
    assert m_mlm == pytest.approx(t_mlm, rel=1e-5)
    assert m_nsp == pytest.approx(t_nsp, rel=1e-5)
    assert set(t_grads) == set(m_grads) == set(init_params(config))
    for key in t_grads:
        scale = max(1e-3, float(np.abs(t_grads[key]).max()))
        np.testing.assert_allclose(m_grads[key], t_grads[key], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=key)


def test_same_steps_same_curve(both):
    """20 Adam steps from the same weights on the same batches (dropout off): same losses."""
    torch_be, mx_be = both
    config = CONFIGS["tiny"]
    settings = OptimizerSettings(lr=1e-3)
    batches = [make_batch(config.vocab_size, batch=8, length=24, seed=s, preds=4, fill=0.75)
               for s in range(5)]
    curves = []
    for backend in both:
        net = build(backend, config)
        opt = backend.create_optimizer(net, settings)
        curves.append([[float(x) for x in backend.train_step(net, opt, batches[i % 5], 1e-3)]
                       for i in range(20)])
    t_curve, m_curve = np.array(curves[0]), np.array(curves[1])
    assert t_curve[-1, 0] < t_curve[0, 0]  # it learned something
    np.testing.assert_allclose(m_curve, t_curve, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("trained_with, loaded_with", [("torch", "mxnet"), ("mxnet", "torch")])
def test_checkpoint_moves_between_frameworks(both, tmp_path, trained_with, loaded_with):
    result = bertlite.train(trained_with, corpus="sample", batch_size=32, max_len=32,
                            num_steps=3, plot=None, progress=False, verbose=False)
    result.save(tmp_path / "ckpt")
    other = bertlite.load(tmp_path / "ckpt", backend=loaded_with)
    assert other.backend.name == loaded_with
    np.testing.assert_allclose(other.encode("a crane is flying"),
                               result.encode("a crane is flying"), rtol=1e-4, atol=1e-5)
    run = subprocess.run([sys.executable, "-m", "bertlite", "encode", "--checkpoint",
                          str(tmp_path / "ckpt"), "--backend", loaded_with, "a crane is flying"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"backend {loaded_with}" in run.stdout and "crane" in run.stdout
