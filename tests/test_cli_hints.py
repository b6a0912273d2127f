"""The CLI speaks to CLI users: ``--backend`` (not the API's ``backend=``), the installed
frameworks named, and a checkpoint whose framework is missing pointed at an installed one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bertlite import checkpoint as ckpt
from bertlite.config import BERTConfig
from bertlite.data.vocab import Vocab
from bertlite.params import init_params
from bertlite.registry import BUILTIN, installed_backends
from conftest import framework_installed

CONFIG = BERTConfig(vocab_size=9, num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_layers=1,
                    max_len=64)
VOCAB = Vocab.from_tokens(["<unk>", "<pad>", "<mask>", "<cls>", "<sep>", "a", "b", "c", "d"])


def bertlite_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bertlite ARGS`` in a process of its own, no backend chosen, its own data cache."""
    env = {k: v for k, v in os.environ.items() if k != "BERTLITE_BACKEND"}
    env["BERTLITE_CACHE"] = str(cwd / "cache")
    return subprocess.run([sys.executable, "-m", "bertlite", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_pretrain_without_backend_names_the_option(tmp_path):
    proc = bertlite_cli("pretrain", "--corpus", "sample", "--steps", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert "--backend" in error and "BERTLITE_BACKEND" in error and "backend=" not in error
    for name in installed_backends():
        assert name in error
    assert not list(tmp_path.iterdir()), "nothing is written before the error"


@pytest.mark.parametrize("command", ["evaluate", "encode"])
def test_checkpoint_of_a_missing_framework_suggests_an_installed_one(tmp_path, command):
    missing = [name for name in BUILTIN if not framework_installed(name)]
    installed = [name for name in BUILTIN if framework_installed(name)]
    if not missing or not installed:
        pytest.skip("needs one framework installed and the other absent (a tox env of one)")
    folder = ckpt.write_checkpoint(tmp_path / "ck", config=CONFIG, vocab=VOCAB,
                                   weights=init_params(CONFIG, 0), backend_name=missing[0])
    args = ["encode", "--checkpoint", str(folder), "a b"] if command == "encode" else \
        ["evaluate", "--checkpoint", str(folder), "--corpus", "sample"]
    proc = bertlite_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"needs {BUILTIN[missing[0]][2]}" in proc.stderr
    assert f"--backend {installed[0]}" in proc.stderr
    # and the suggestion works: the same checkpoint runs on the installed framework
    ok = bertlite_cli(*args, "--backend", installed[0], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_status_line_comes_before_the_slow_part(tmp_path, backend_name):
    """The first line on stderr says what is starting; the data step says whether it prepares
    or reads the cache; both come before the progress bar, and --no-progress drops them."""
    args = ["pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "1",
            "--batch-size", "8", "--max-len", "32", "--no-plot"]
    cold = bertlite_cli(*args, cwd=tmp_path)
    assert cold.returncode == 0, cold.stderr
    lines = cold.stderr.splitlines()
    assert lines[0] == (f"bertlite pretrain: starting {backend_name}, reading the sample corpus "
                        "(train split) ...")
    assert lines[1].startswith("bertlite pretrain: wiki.train.tokens: preparing the data")
    assert "%|" in cold.stderr.split("preparing the data", 1)[1]  # the bar comes after
    warm = bertlite_cli(*args, cwd=tmp_path)
    assert "wiki.train.tokens: prepared data read from the cache" in warm.stderr
    quiet = bertlite_cli(*args, "--no-progress", cwd=tmp_path)
    assert quiet.returncode == 0 and "bertlite pretrain:" not in quiet.stderr
