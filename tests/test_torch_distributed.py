"""DistributedDataParallel in the torch backend: two CPU processes with Gloo on 127.0.0.1 train
exactly like one process with the same global batch; only rank 0 prints, plots and writes
checkpoints; resume and skipped steps work across processes; and the documented ``torchrun``
launch works."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, gloo_rank_env

from conftest import skip_unless_backend

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.0,
             max_len=32)
OPTIONS = dict(corpus="sample", config=SMALL, batch_size=16, max_len=32, num_steps=4, seed=5,
               lr=0.01, progress=False)


@pytest.fixture(autouse=True)
def _torch_only():
    skip_unless_backend("torch")


def poison_batches(step: int, row: int):
    """Patch the data so that the batch of ``step`` (1-based) has a NaN MLM weight in ``row``:
    its loss is NaN, in the share of whichever process gets that row. Returns the undo."""
    from bertlite.data.loader import BatchIterator

    stream = BatchIterator.stream

    def poisoned(self, epoch=0, start=0):
        for n, (e, i, batch) in enumerate(stream(self, epoch, start), 1):
            if n == step:
                batch.mlm_weights[row] = np.nan
            yield e, i, batch

    BatchIterator.stream = poisoned
    return lambda: setattr(BatchIterator, "stream", stream)


def backend_steps(accumulate: int = 1) -> dict[str, np.ndarray]:
    """Three train_step calls of the backend on global batches of 15 rows (uneven shares),
    with an Adam whose update is a smooth function of the gradient (eps=1: with a tiny eps it
    is lr * sign(g) for gradients near 0, which turns float32 round-off into steps of lr);
    the losses, weights and optimizer state."""
    from bertlite.config import BERTConfig
    from bertlite.data.loader import load_data_wiki
    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params
    from bertlite.registry import get_backend

    be = get_backend("torch")
    devices = be.parse_devices(None)
    batches, vocab = load_data_wiki(15, 32, corpus="sample", seed=0)
    config = BERTConfig(vocab_size=len(vocab), **SMALL)
    model = be.build_model(config, devices)
    be.load_state_dict(model, init_params(config, 0))
    opt = be.create_optimizer(model, OptimizerSettings(lr=0.5, eps=1.0))
    stream = batches.stream()
    options = {"accumulate": accumulate} if accumulate > 1 else {}
    losses = [[float(x) for x in be.train_step(model, opt, next(stream)[2], 0.5, **options)]
              for _ in range(3)]
    return {"losses": np.asarray(losses), **be.state_dict(model),
            **{f"opt/{k}": v for k, v in be.optimizer_state(opt).items()}}


def _worker(rank: int, world_size: int, port: int, out: str, options: dict) -> None:
    """One rank: the environment torchrun would set, then bertlite.train as a user calls it
    (or, with ``options["steps"]``, the backend's train_step). Records what this rank printed
    and which files it wrote."""
    os.environ.update(gloo_rank_env(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    if "steps" in options:
        np.savez(Path(out) / f"rank{rank}.npz", **backend_steps(options["steps"]))
        (Path(out) / f"rank{rank}.json").write_text("{}")
        return
    import bertlite
    import bertlite.api
    import bertlite.plot

    writes: list[str] = []
    write_checkpoint, plot_history = bertlite.api.ckpt.write_checkpoint, \
        bertlite.plot.plot_history

    def recording_write(path, **kwargs):
        writes.append(f"checkpoint {Path(path).name}")
        return write_checkpoint(path, **kwargs)

    def recording_plot(history, path, **kwargs):
        writes.append(f"plot {Path(path).name}")
        return plot_history(history, path, **kwargs)

    bertlite.api.ckpt.write_checkpoint = recording_write
    bertlite.plot.plot_history = recording_plot
    options = dict(options)
    if "poison" in options:
        poison_batches(*options.pop("poison"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bertlite.train("torch", **options)
    h = result.history
    np.savez(Path(out) / f"rank{rank}.npz", mlm=np.asarray(h.mlm_loss),
             nsp=np.asarray(h.nsp_loss), skipped=np.asarray(h.skipped, dtype=np.int64),
             **result.state_dict())
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"printed": printed.getvalue(), "writes": writes, "main": result.backend.is_main_process(),
         "devices": result.backend.describe_devices(result.devices)}))


def _spawn(tmp_path: Path, options: dict, world_size: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    mp.spawn(_worker, args=(world_size, free_port(), str(out), options), nprocs=world_size,
             join=True)
    ranks = []
    for rank in range(world_size):
        arrays = dict(np.load(out / f"rank{rank}.npz"))
        ranks.append({**json.loads((out / f"rank{rank}.json").read_text()), **arrays})
    return ranks


def _close(actual: dict, expected: dict, names, *, rtol: float, atol: float) -> None:
    for name in names:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol,
                                   err_msg=name)


def _assert_same_run(ranks: list[dict], single, *, atol: float) -> None:
    # every rank reports the global batch's losses, equal to one process's
    for r in ranks:
        np.testing.assert_allclose(r["mlm"], single.history.mlm_loss, rtol=2e-5)
        np.testing.assert_allclose(r["nsp"], single.history.nsp_loss, rtol=2e-5)
    weights = single.state_dict()
    for name in weights:  # the replicas stay identical
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    # A key bias adds the same score to every key of a query: softmax ignores it, its true
    # gradient is 0, and Adam turns the round-off (1e-11) into steps of about lr.
    _close(ranks[0], weights, [n for n in weights if not n.endswith("W_k.bias")], rtol=1e-4,
           atol=atol)


def _moments_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Adam's moments (the gradients' running mean and square, scale-sensitive unlike Adam's
    update), to float32 round-off of the largest of their kind."""
    for kind in ("exp_avg", "exp_avg_sq"):
        names = [n for n in expected if n.endswith("." + kind)]
        scale = max(float(np.abs(expected[n]).max()) for n in names)
        _close(actual, expected, names, rtol=1e-4, atol=1e-5 * scale)
    assert int(actual["step"]) == int(expected["step"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_step_equals_one_process_step(tmp_path, accumulate):
    """The backend's train_step over 2 processes (with 2 micro-batches each): losses, weights
    and Adam's state equal one process's on the same global batches of 15 rows."""
    ranks = _spawn(tmp_path, {"steps": accumulate})
    single = backend_steps()
    for r in ranks:
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
    weights = [n for n in single if n != "losses" and not n.startswith("opt/")]
    for name in weights:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    _close(ranks[0], single, weights, rtol=1e-5, atol=1e-6)
    strip = {n[4:]: v for n, v in single.items() if n.startswith("opt/")}
    _moments_close({n[4:]: v for n, v in ranks[0].items() if n.startswith("opt/")}, strip)


def test_two_processes_train_like_one(tmp_path):
    """``bertlite.train`` as a user launches it on every rank: the same losses and model as one
    process, and only rank 0 prints the summary, plots and writes checkpoints."""
    import bertlite
    from bertlite.checkpoint import read_checkpoint

    plot, ckpt = tmp_path / "loss.png", tmp_path / "ckpt"
    ranks = _spawn(tmp_path, {**OPTIONS, "plot": str(plot), "checkpoint_dir": str(ckpt),
                              "checkpoint_every": 2})
    single = bertlite.train("torch", **OPTIONS, plot=None, verbose=False,
                            checkpoint_dir=tmp_path / "single")
    # Adam with its default eps=1e-8 moves a weight by about lr whatever its gradient, also
    # when that gradient is tiny and mostly float32 round-off: weights agree to a fraction of
    # lr, the gradients' moments to round-off (test_ddp_step_equals_one_process_step is exact)
    _assert_same_run(ranks, single, atol=2e-3)
    _moments_close(read_checkpoint(ckpt, with_trainer=True)["trainer_arrays"],
                   read_checkpoint(tmp_path / "single", with_trainer=True)["trainer_arrays"])
    assert [r["main"] for r in ranks] == [True, False]
    assert ranks[0]["printed"].count("MLM loss") == 1 and ranks[1]["printed"] == ""
    assert "x 2 processes" in ranks[0]["printed"]
    assert ranks[0]["writes"] == ["checkpoint step-000002", "checkpoint step-000004",
                                  "plot loss.png"]
    assert ranks[1]["writes"] == []
    assert plot.is_file()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002", "step-000004"]


def test_two_processes_with_accumulation_and_resume(tmp_path):
    """DDP with 2 micro-batches per process (a global batch of 15 rows: uneven shares), then
    every rank resumes from rank 0's checkpoint and the run equals an uninterrupted one."""
    import bertlite

    options = {**OPTIONS, "batch_size": 15, "accumulate": 2, "plot": None}
    ckpt = tmp_path / "ckpt"
    _spawn(tmp_path, {**options, "num_steps": 2, "checkpoint_dir": str(ckpt)})
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002"]
    ranks = _spawn(tmp_path, {**options, "checkpoint_dir": str(ckpt), "resume": True})
    single = bertlite.train("torch", **{**options, "accumulate": 1}, verbose=False)
    _assert_same_run(ranks, single, atol=2e-3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002", "step-000004"]


def test_nonfinite_skip_is_collective(tmp_path):
    """A NaN in rank 1's share of step 2's batch only: both processes skip that update, and the
    run equals one process skipping it."""
    import bertlite

    options = {**OPTIONS, "plot": None, "on_nan": "skip", "verbose": False}
    ranks = _spawn(tmp_path, {**options, "poison": (2, 15)})
    undo = poison_batches(2, 15)
    try:
        single = bertlite.train("torch", **options)
    finally:
        undo()
    assert single.history.skipped == [2] and single.history.step == [1, 3, 4]
    for r in ranks:
        assert r["skipped"].tolist() == [2]
    _assert_same_run(ranks, single, atol=2e-3)


@pytest.mark.slow
def test_torchrun_launch(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) \
        or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    env = {**os.environ, "MPLBACKEND": "Agg", "GLOO_SOCKET_IFNAME": "lo"}
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "bertlite", "pretrain",
         "--backend", "torch", "--corpus", "sample", "--steps", "2", "--batch-size", "16",
         "--max-len", "32", "--config", "tiny", "--no-plot", "--no-progress",
         "--checkpoint-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("MLM loss") == 1, run.stdout
    assert run.stdout.count("sentence pairs/sec on [device(type='cpu')] x 2 processes") == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000002"]
