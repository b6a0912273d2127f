"""The backend-neutral core: no framework at import, the registry, config, loss formula,
initial weights and schedule. Runs in every tox env, with or without a framework."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bertlite
from bertlite import registry
from bertlite.config import BERTConfig, resolve_config
from bertlite.errors import BackendError
from bertlite.install import install_command
from bertlite.loss import bert_loss, bert_loss_numpy, cross_entropy_numpy
from bertlite.optim import OptimizerSettings
from bertlite.params import init_params, is_no_decay, parameter_shapes


def test_import_pulls_in_no_framework():
    code = textwrap.dedent("""
        import json, sys
        import bertlite, bertlite.backends, bertlite.cli
        from bertlite.data import load_data_wiki
        bertlite.available_backends()
        print(json.dumps(sorted(m for m in sys.modules
                                if m.split('.')[0] in ('torch', 'mxnet', 'd2l'))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendError, match=r"unknown backend 'jax'.*\['mxnet', 'torch'\]"):
        bertlite.get_backend("jax")


def test_no_backend_chosen_says_how_to_choose(monkeypatch):
    monkeypatch.delenv("BERTLITE_BACKEND", raising=False)
    with pytest.raises(BackendError, match="BERTLITE_BACKEND"):
        bertlite.get_backend()


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("BERTLITE_BACKEND", "no-such-backend")
    with pytest.raises(BackendError, match="no-such-backend"):
        bertlite.train(num_steps=1)


def test_missing_framework_gives_pip_hint(monkeypatch):
    real_find_spec = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mxnet" else real_find_spec(name, *a))
    monkeypatch.setattr(registry, "_instances", {})
    with pytest.raises(ImportError) as raised:
        bertlite.get_backend("mxnet")
    assert str(raised.value).endswith(install_command("mxnet"))
    assert "mxnet" not in registry.installed_backends()


def _fake_distribution(tmp_path, name, target):
    dist = tmp_path / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[bertlite.backends]\n{name} = {target}\n")


def test_third_party_backend_is_found_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "toybackend.py").write_text(textwrap.dedent("""
        from bertlite.backend import Backend

        class ToyBackend(Backend):
            name = "toy"
        for _m in list(ToyBackend.__abstractmethods__):
            setattr(ToyBackend, _m, lambda self, *a, **k: None)
        ToyBackend.__abstractmethods__ = frozenset()
    """))
    _fake_distribution(tmp_path, "toy", "toybackend:ToyBackend")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_instances", {})
    assert "toy" in bertlite.available_backends()
    assert bertlite.get_backend("toy").name == "toy"


def test_broken_third_party_backend_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "brokenbackend.py").write_text("raise RuntimeError('boom at import')\n")
    _fake_distribution(tmp_path, "broken", "brokenbackend:Broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_instances", {})
    with pytest.raises(BackendError, match=r"'broken' \(brokenbackend:Broken\) failed to load: "
                                           r"RuntimeError: boom at import"):
        bertlite.get_backend("broken")


@pytest.mark.parametrize("fields, message", [
    (dict(num_hiddens=130, num_heads=4), "divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(ffn_num_hiddens=-1), "ffn_num_hiddens"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(vocab_size=2.5), "vocab_size"),
])
def test_invalid_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        BERTConfig(**{"vocab_size": 100, **fields})


def test_presets():
    tiny = BERTConfig.from_preset("tiny", 4271)
    assert (tiny.num_layers, tiny.num_hiddens, tiny.ffn_num_hiddens, tiny.num_heads,
            tiny.dropout) == (2, 128, 256, 2, 0.2)
    base = BERTConfig.from_preset("base", 30522)
    assert (base.num_layers, base.num_hiddens, base.ffn_num_hiddens, base.num_heads) == \
        (12, 768, 3072, 12)
    # BERT-base with a 30k vocabulary and 512 positions has about 110M parameters; like the
    # book, bertlite does not tie the MLM decoder to the token embedding (vocab x hidden more)
    untied = base.replace(max_len=512).num_parameters()
    assert 105e6 < untied - 30522 * 768 < 115e6
    large = BERTConfig.from_preset("large", 30522)
    assert (large.num_layers, large.num_hiddens, large.num_heads) == (24, 1024, 16)
    with pytest.raises(ValueError, match="unknown config preset 'huge'"):
        BERTConfig.from_preset("huge", 10)
    with pytest.raises(ValueError, match="positional-embedding table"):
        resolve_config(BERTConfig(vocab_size=10, max_len=32), 10, max_len=64)


def test_num_parameters_counts_every_parameter():
    config = BERTConfig(vocab_size=97, num_hiddens=16, ffn_num_hiddens=24, num_heads=2,
                        num_layers=3, max_len=40)
    assert config.num_parameters() == sum(int(np.prod(s))
                                          for s in parameter_shapes(config).values())


def test_init_params_is_a_function_of_the_seed():
    config = BERTConfig(vocab_size=50, num_hiddens=8, ffn_num_hiddens=16, max_len=16)
    a, b, c = init_params(config, 1), init_params(config, 1), init_params(config, 2)
    assert list(a) == list(parameter_shapes(config))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["mlm.decoder.weight"], c["mlm.decoder.weight"])
    assert all(v.dtype == np.float32 for v in a.values())
    assert np.all(a["encoder.blks.0.addnorm1.ln.weight"] == 1)
    assert np.all(a["hidden.bias"] == 0)
    assert is_no_decay("mlm.ln.weight") and is_no_decay("hidden.bias")
    assert not is_no_decay("encoder.blks.0.attention.W_q.weight")


def test_loss_ignores_padded_prediction_slots():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3, 11))
    labels = rng.integers(0, 11, (4, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=np.float32)
    nsp_logits, nsp_labels = rng.normal(size=(4, 2)), np.array([0, 1, 1, 0])
    before = bert_loss_numpy(logits, labels, weights, nsp_logits, nsp_labels)
    changed = logits.copy()
    changed[weights == 0] = rng.normal(scale=50, size=changed[weights == 0].shape)
    labels2 = labels.copy()
    labels2[weights == 0] = 0
    after = bert_loss_numpy(changed, labels2, weights, nsp_logits, nsp_labels)
    assert before == pytest.approx(after, rel=1e-12)
    # and it is the weighted mean of per-example cross-entropy, as in the book's MXNet tab
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    assert before[0] == pytest.approx((ce * weights).sum() / (weights.sum() + 1e-8))


def test_shard_losses_add_up_to_the_batch_loss():
    """With the whole batch's normalizers, per-shard losses sum to the one-device loss."""
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(5, 2, 7)), rng.integers(0, 7, (5, 2))
    weights = (rng.random((5, 2)) < 0.7).astype(np.float64)
    weights[:, 0] = 1
    nsp_logits, nsp_labels = rng.normal(size=(5, 2)), rng.integers(0, 2, 5)
    whole = bert_loss_numpy(logits, labels, weights, nsp_logits, nsp_labels)

    mlm_ce = cross_entropy_numpy(logits.reshape(-1, 7), labels).reshape(5, 2)
    nsp_ce = cross_entropy_numpy(nsp_logits, nsp_labels)
    parts = [bert_loss(mlm_ce[s].reshape(-1), weights[s].reshape(-1), nsp_ce[s],
                       mlm_weight_total=weights.sum(), num_examples=5)
             for s in (slice(0, 3), slice(3, 5))]
    assert sum(float(p[0]) for p in parts) == pytest.approx(whole[0])
    assert sum(float(p[1]) for p in parts) == pytest.approx(whole[1])


def test_learning_rate_schedules():
    constant = OptimizerSettings(lr=0.01)
    assert [constant.lr_at(s) for s in (0, 10, 1000)] == [0.01] * 3
    warm = OptimizerSettings(lr=1.0, warmup_steps=4, schedule="linear", total_steps=12)
    assert [warm.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warm.lr_at(8) == pytest.approx(0.5)
    assert warm.lr_at(12) == pytest.approx(0.0)
    cosine = OptimizerSettings(lr=1.0, schedule="cosine", total_steps=10)
    assert cosine.lr_at(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        OptimizerSettings(lr=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        OptimizerSettings(schedule="step")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), "num_steps must be a positive integer"),
    (dict(num_steps=-3), "num_steps must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(config="huge"), "unknown config preset 'huge'"),
])
def test_train_rejects_bad_settings_before_work(kwargs, message, monkeypatch):
    from bertlite.backend import Backend

    class Fake(Backend):
        name = "fake"

    for m in list(Fake.__abstractmethods__):
        setattr(Fake, m, lambda self, *a, **k: [])
    Fake.__abstractmethods__ = frozenset()
    with pytest.raises(ValueError, match=message):
        bertlite.train(Fake(), corpus="sample", **kwargs)
