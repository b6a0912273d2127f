"""What happens when things go wrong: every bad input gets one clear message (Python API and
CLI alike: exit status 2, no traceback) and nothing is written half-way; killed runs resume
from their last complete checkpoint; concurrent cache builds never tear a file."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bertlite
from bertlite import checkpoint as ckpt

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.0,
             max_len=64)


def _corpus(folder: Path, content: bytes | str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if content is not None:
        data = content.encode() if isinstance(content, str) else content
        (folder / "wiki.train.tokens").write_bytes(data)
    return folder


LONG_LINE = " " + " . ".join(" ".join(f"w{i}" for i in range(120)) for _ in range(4)) + " . \n"
GPU = {"torch": "cuda:0", "mxnet": "gpu:0"}

#: (id, corpus file content or None for "no file", API keyword changes, CLI arguments,
#:  expected message). A folder "data" is made for each case; ``data_dir`` points at it.
CASES = [
    ("missing-folder", "skip-folder", {}, [], "does not exist"),
    ("missing-split", None, {}, [], r"wiki\.train\.tokens is missing"),
    ("empty-file", "", {}, [], "no paragraph of two or more sentences"),
    ("binary-garbage", bytes(range(256)) * 20, {}, [], "looks binary"),
    ("not-utf8", " caf\xe9 . au lait . \n".encode("latin-1"), {}, [], "not UTF-8"),
    ("no-two-sentences", " = Title = \n just one sentence here \n", {}, [],
     "no paragraph of two or more sentences"),
    ("lines-longer-than-max-len", LONG_LINE * 5, {}, [], "no sentence pair fits in max_len"),
    ("max-len-too-small", "sample", {"max_len": 3}, ["--max-len", "3"],
     "max_len must be at least 4"),
    ("batch-larger-than-data", "sample", {"batch_size": 100_000}, ["--batch-size", "100000"],
     "larger than the data"),
    ("zero-steps", "sample", {"num_steps": 0}, ["--steps", "0"],
     "num_steps must be a positive integer"),
    ("negative-steps", "sample", {"num_steps": -5}, ["--steps", "-5"],
     "num_steps must be a positive integer"),
    ("lr-not-positive", "sample", {"lr": 0.0}, ["--lr", "0"], "lr must be a positive number"),
    ("heads-not-dividing-hidden", "sample", {"config": {**SMALL, "num_heads": 3}}, None,
     "divisible by num_heads"),
    ("unknown-preset", "sample", {"config": "huge"}, ["--config", "huge"],
     "(unknown config preset 'huge'|invalid choice: 'huge')"),
    ("max-len-beyond-positions", "sample", {"config": {**SMALL, "max_len": 16}},
     ["--max-len", "2000"], "positional-embedding table"),
    ("unknown-device", "sample", {"devices": "tpu:0"}, ["--devices", "tpu:0"], "tpu"),
    ("gpu-where-none", "sample", {"devices": "GPU"}, ["--devices", "GPU"], "GPU"),
    ("unknown-backend", "sample", {"backend": "jax"}, ["--backend", "jax"],
     r"unknown backend 'jax'"),
]


def _case_setup(tmp_path, content, backend_name, kwargs, cli):
    data = tmp_path / "data"
    if content == "sample":
        api = {"corpus": "sample"}
        args = ["--corpus", "sample"]
    else:
        if content != "skip-folder":
            _corpus(data, content)
        api = {"data_dir": data}
        args = ["--data-dir", str(data)]
    api = {"backend": backend_name, "config": SMALL, "batch_size": 8, "max_len": 32,
           "num_steps": 2, "plot": tmp_path / "work" / "loss.png", "progress": False,
           "verbose": False, **api, **kwargs}
    if api.get("devices") == "GPU":
        api["devices"] = GPU[backend_name]
    if cli is not None:
        cli = [("--devices" if a == "GPU" else a) if a != "GPU" else GPU[backend_name]
               for a in cli]
        args = ["pretrain", "--backend", backend_name, "--steps", "2", "--batch-size", "8",
                "--max-len", "32", *args, *cli, "--no-progress"]
    return api, args


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_api(case, backend_name, tmp_path):
    _, content, kwargs, cli, message = case
    api, _ = _case_setup(tmp_path, content, backend_name, kwargs, cli)
    with pytest.raises((ValueError, ImportError)) as info:
        bertlite.train(**api)
    import re

    assert re.search(message, str(info.value)), str(info.value)
    assert not (tmp_path / "work").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c[3] is not None],
                         ids=[c[0] for c in CASES if c[3] is not None])
def test_bad_input_through_the_cli(case, backend_name, tmp_path, monkeypatch, capsys):
    """The first case through ``python -m bertlite`` (a process's exit status and stderr); the
    others through the same ``main`` in this process (no interpreter start for each)."""
    _, content, kwargs, cli, message = case
    _, args = _case_setup(tmp_path, content, backend_name, kwargs, cli)
    work = tmp_path / "work"
    work.mkdir()
    if case is CASES[0]:
        run = subprocess.run([sys.executable, "-m", "bertlite", *args], capture_output=True,
                             text=True, cwd=work, timeout=300,
                             env={**os.environ, "MPLBACKEND": "Agg"})
        status, stderr = run.returncode, run.stderr
    else:
        from bertlite.cli import main

        monkeypatch.chdir(work)
        try:
            status = main(args)
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code
        stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert "Traceback" not in stderr
    import re

    assert re.search(message, stderr), stderr
    assert list(work.iterdir()) == []  # no plot, no checkpoint, nothing half-written


def test_unwritable_checkpoint_folder_fails_before_training(backend_name, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write checkpoints to"):
        bertlite.train(backend_name, corpus="sample", config=SMALL, batch_size=8, max_len=32,
                       num_steps=2, plot=None, progress=False,
                       checkpoint_dir=blocker / "ckpt")


def _prepare_in_process(args):
    path, cache_dir, barrier = args
    from bertlite.data.loader import prepare_data

    barrier.wait()
    examples, vocab = prepare_data(path, 64, seed=0, cache_dir=cache_dir)
    return {k: v.tobytes() for k, v in examples.arrays().items()}, vocab.idx_to_token


def test_two_processes_preparing_the_same_cache(tmp_path):
    from bertlite.data.corpus import SAMPLE_DIR

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = pool.map(_prepare_in_process,
                           [(SAMPLE_DIR / "wiki.train.tokens", tmp_path, barrier)] * 2)
    assert results[0] == results[1]
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # one whole file, no temporaries
    from bertlite.data.loader import prepare_data

    cached, _ = prepare_data(SAMPLE_DIR / "wiki.train.tokens", 64, seed=0, cache_dir=tmp_path)
    assert {k: v.tobytes() for k, v in cached.arrays().items()} == results[0][0]


def _pretrain_cmd(backend_name, ckpt_dir, steps):
    return [sys.executable, "-m", "bertlite", "pretrain", "--backend", backend_name,
            "--corpus", "sample", "--steps", str(steps), "--batch-size", "16", "--max-len",
            "32", "--checkpoint-dir", str(ckpt_dir), "--checkpoint-every", "1",
            "--keep-checkpoints", "2", "--resume", "--no-plot", "--no-progress", "--seed", "5"]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(backend_name, tmp_path):
    """Killed (SIGKILL) several times, at random moments including during checkpoint writes,
    the run resumes from its last complete checkpoint and ends with the losses of a run that
    was never interrupted."""
    steps = 80
    clean = subprocess.run(_pretrain_cmd(backend_name, tmp_path / "clean", steps),
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    rng = np.random.default_rng(0)
    killed_dir = tmp_path / "killed"
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(_pretrain_cmd(backend_name, killed_dir, steps),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until it is training (a checkpoint newer than the last one appears), then kill
        before = max([s for s, _ in ckpt.list_checkpoints(killed_dir)], default=0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            now = max([s for s, _ in ckpt.list_checkpoints(killed_dir)], default=0)
            if now > before:
                break
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.15)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # whatever moment it died at, the newest checkpoint is complete and loadable
        found = ckpt.read_checkpoint(killed_dir, with_trainer=True)
        assert found["trainer_state"]["step"] >= 1
    assert kills >= 2
    final = subprocess.run(_pretrain_cmd(backend_name, killed_dir, steps), capture_output=True,
                           text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    resumed = ckpt.read_checkpoint(killed_dir, with_trainer=True)["trainer_state"]["history"]
    reference = ckpt.read_checkpoint(tmp_path / "clean", with_trainer=True)[
        "trainer_state"]["history"]
    assert resumed["step"] == list(range(1, steps + 1))
    np.testing.assert_allclose(resumed["mlm_loss"], reference["mlm_loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(resumed["nsp_loss"], reference["nsp_loss"], rtol=1e-4, atol=1e-5)
    # the last run cleared what killed writes left half-way
    assert sorted(p.name for p in killed_dir.iterdir()) == ["step-000079", "step-000080"]
