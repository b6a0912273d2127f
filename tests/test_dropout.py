"""The model's dropout from the API and the CLI: ``train(dropout=)`` and ``--dropout``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bertlite
from bertlite.config import resolve_config
from bertlite.data.loader import load_data_wiki
from bertlite.params import init_params

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.1,
             max_len=64)
RUN = dict(corpus="sample", config=SMALL, batch_size=16, max_len=32, seed=3, plot=None,
           progress=False, verbose=False)


def _run(backend, **kwargs):
    return bertlite.train(backend, **{**RUN, "num_steps": 1, **kwargs})


def test_dropout_option_reaches_the_model(backend):
    """The first step's training loss is the loss of the initial weights with dropout off
    exactly when ``dropout=0``; ``dropout=0.5`` changes it; no option keeps the config's."""
    batches, vocab = load_data_wiki(16, 32, corpus="sample", seed=3)
    _, _, batch = next(batches.stream())
    config = resolve_config(SMALL, len(vocab), max_len=32)
    net = backend.build_model(config.replace(dropout=0.0), backend.parse_devices(None))
    backend.load_state_dict(net, init_params(config, 3))
    mlm, nsp, _ = backend.loss_and_grads(net, batch)

    off, on, default = _run(backend, dropout=0.0), _run(backend, dropout=0.5), _run(backend)
    assert (off.config.dropout, on.config.dropout, default.config.dropout) == (0.0, 0.5, 0.1)
    np.testing.assert_allclose([off.history.mlm_loss[0], off.history.nsp_loss[0]], [mlm, nsp],
                               rtol=1e-5)
    assert abs(on.history.mlm_loss[0] - mlm) > 1e-3
    assert abs(default.history.mlm_loss[0] - mlm) > 1e-4


def test_dropout_zero_runs_are_deterministic_and_split_free(backend):
    """Without dropout two runs are equal, and computing each batch as two micro-batches
    changes nothing beyond float round-off."""
    a = _run(backend, dropout=0.0, num_steps=3)
    b = _run(backend, dropout=0.0, num_steps=3)
    np.testing.assert_array_equal(a.history.mlm_loss, b.history.mlm_loss)
    split = _run(backend, dropout=0.0, num_steps=3, accumulate=2)
    np.testing.assert_allclose(split.history.mlm_loss, a.history.mlm_loss, rtol=1e-4)
    np.testing.assert_allclose(split.history.nsp_loss, a.history.nsp_loss, rtol=1e-4)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.2", True])
def test_bad_dropout_is_refused_before_any_work(bad, tmp_path):
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        bertlite.train("no-such-backend", dropout=bad, data_dir=tmp_path)


def _cli(*args):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "bertlite", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_cli_dropout(backend_name, tmp_path):
    bad = _cli("pretrain", "--backend", backend_name, "--corpus", "sample", "--dropout", "1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "dropout must be a probability in [0, 1) (0 turns dropout off), got 1.0" in bad.stderr
    run = _cli("pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "1",
               "--batch-size", "8", "--max-len", "32", "--no-plot", "--no-progress",
               "--dropout", "0.05", "--save", str(tmp_path / "model"))
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model"]["dropout"] == 0.05
    assert "--dropout P" in _cli("pretrain", "--help").stdout
