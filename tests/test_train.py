"""End to end, for every installed backend: train on real text, the summary, the plot, the
CLI, encodings, checkpoints and exact resume."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import bertlite
from bertlite.errors import CheckpointError

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.1,
             max_len=64)


@pytest.mark.slow
def test_short_run_on_wikitext2_lowers_the_loss(backend_name, wikitext_dir, tmp_path, capsys):
    plot = tmp_path / "loss.png"
    result = bertlite.train(backend_name, data_dir=wikitext_dir, split="valid", batch_size=64,
                            max_len=64, num_steps=40, lr=0.01, seed=0, plot=plot,
                            progress=False)
    out = capsys.readouterr().out
    assert f"MLM loss {result.mlm_loss:.3f}, NSP loss {result.nsp_loss:.3f}" in out
    assert "sentence pairs/sec on [" in out
    h = result.history
    assert h.step == list(range(1, 41)) and len(h.mlm_loss) == 40
    assert len(result.vocab) == 4271  # the book's vocabulary of this split
    # the MLM loss starts near chance (ln |V|) and falls
    assert abs(h.mlm_loss[0] - np.log(len(result.vocab))) < 1.0
    assert np.mean(h.mlm_loss[-5:]) < np.mean(h.mlm_loss[:5]) - 1.0
    assert result.pairs_per_sec > 0 and h.pairs == 40 * 64
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def _tiny_run(backend_name, **kwargs):
    options = dict(corpus="sample", config=SMALL, batch_size=16, max_len=32, num_steps=6,
                   seed=3, plot=None, progress=False, verbose=False)
    return bertlite.train(backend_name, **{**options, **kwargs})


def test_get_bert_encoding_is_deterministic_and_contextual(backend_name):
    result = _tiny_run(backend_name)
    tokens_a = ["a", "crane", "is", "flying"]
    encoded = bertlite.get_bert_encoding(result, tokens_a)
    assert encoded.shape == (1, 6, 32)
    np.testing.assert_array_equal(encoded, bertlite.get_bert_encoding(result, tokens_a))
    pair = bertlite.get_bert_encoding(result, ["a", "crane", "driver", "came"],
                                      ["he", "just", "left"])
    assert pair.shape == (1, 10, 32)
    assert not np.allclose(encoded[0, 2], pair[0, 2])  # "crane" depends on its context
    with pytest.raises(ValueError, match="tokens_a is empty"):
        result.encode([])
    with pytest.raises(ValueError, match="more than the model's maximum length 64"):
        result.encode(["word"] * 70)
    unknown = result.encode(["zzzqqq"])  # unknown words are <unk>, not an error
    np.testing.assert_allclose(unknown, result.encode(["<unk>"]), rtol=1e-6, atol=1e-6)


def test_same_seed_same_run_other_seed_other_run(backend_name):
    a, b = _tiny_run(backend_name, num_steps=3), _tiny_run(backend_name, num_steps=3)
    c = _tiny_run(backend_name, num_steps=3, seed=4)
    np.testing.assert_allclose(a.history.mlm_loss, b.history.mlm_loss, rtol=1e-5)
    assert not np.allclose(a.history.mlm_loss, c.history.mlm_loss)


def test_checkpoint_round_trip(backend_name, tmp_path):
    result = _tiny_run(backend_name)
    result.save(tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", "model.safetensors", "vocab.txt"]
    loaded = bertlite.load(tmp_path / "ckpt")
    assert loaded.backend.name == backend_name and loaded.vocab == result.vocab
    weights, again = result.state_dict(), loaded.state_dict()
    assert all(np.array_equal(weights[k], again[k]) for k in weights)
    np.testing.assert_allclose(loaded.encode("a crane is flying"),
                               result.encode("a crane is flying"), rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(backend_name, tmp_path):
    """2N steps in one go equal N steps, a stop, and N more from the checkpoint."""
    full = _tiny_run(backend_name, num_steps=8)
    first = _tiny_run(backend_name, num_steps=4, checkpoint_dir=tmp_path / "run",
                      checkpoint_every=2)
    assert [p.name for p in sorted((tmp_path / "run").iterdir())] == \
        ["step-000002", "step-000004"]
    resumed = _tiny_run(backend_name, num_steps=8, checkpoint_dir=tmp_path / "run",
                        checkpoint_every=2, resume=True, keep_checkpoints=2)
    assert resumed.history.step == list(range(1, 9))
    np.testing.assert_allclose(resumed.history.mlm_loss[:4], first.history.mlm_loss, rtol=1e-6)
    np.testing.assert_allclose(resumed.history.mlm_loss, full.history.mlm_loss, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(resumed.history.nsp_loss, full.history.nsp_loss, rtol=1e-4,
                               atol=1e-5)
    assert [p.name for p in sorted((tmp_path / "run").iterdir())] == \
        ["step-000006", "step-000008"]
    with pytest.raises(CheckpointError, match="batch_size 16 -> 8"):
        _tiny_run(backend_name, num_steps=9, batch_size=8, checkpoint_dir=tmp_path / "run",
                  resume=True)


def _cli(*args, env_extra=None, cwd=None):
    env = {**os.environ, "MPLBACKEND": "Agg", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bertlite", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_cli_pretrain_then_encode(backend_name, tmp_path):
    run = _cli("pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "3",
               "--batch-size", "32", "--max-len", "32", "--plot", str(tmp_path / "p.png"),
               "--save", str(tmp_path / "model"), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "MLM loss" in run.stdout and "sentence pairs/sec on" in run.stdout
    assert (tmp_path / "p.png").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    enc = _cli("encode", "--checkpoint", str(tmp_path / "model"), "a crane is flying")
    assert enc.returncode == 0, enc.stderr
    lines = enc.stdout.splitlines()
    assert "(6, 128)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["<cls>", "a", "crane", "is", "flying",
                                                       "<sep>"]


def test_cli_usage_errors_are_one_line(backend_name, tmp_path):
    bad = _cli("pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "num_steps must be a positive integer" in bad.stderr
    missing = _cli("pretrain", "--backend", backend_name, "--data-dir", str(tmp_path))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "wiki.train.tokens is missing" in missing.stderr
    nockpt = _cli("encode", "--checkpoint", str(tmp_path / "nope"), "hello")
    assert nockpt.returncode == 2 and "does not exist" in nockpt.stderr


def test_cli_info_lists_backends():
    run = _cli("info", "--config", "tiny")
    assert run.returncode == 0, run.stderr
    assert "backend torch" in run.stdout and "backend mxnet" in run.stdout
    assert "chance NSP loss ln 2 0.693" in run.stdout
