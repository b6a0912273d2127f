"""MXNet's dist_sync kvstore: two worker processes (with a scheduler and a server, all on
127.0.0.1, started by ``bertlite.launch``) train exactly like one process on the same global
batch; only worker 0 prints, plots and writes checkpoints; the launcher passes on the workers'
exit status."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from helpers import run_launch_job

from bertlite import launch
from conftest import skip_unless_backend

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.0,
             max_len=32)
OPTIONS = dict(corpus="sample", config=SMALL, batch_size=16, max_len=32, num_steps=4, seed=5,
               lr=0.01, progress=False)
#: seconds a whole job may take (it takes about 7 s here); the launcher's own limit is shorter
JOB_TIMEOUT = 240

#: a worker: bertlite.train as a user calls it, recording what this process wrote
WORKER = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from pathlib import Path

    import numpy as np

    import bertlite
    import bertlite.plot
    from bertlite import checkpoint

    out, options = Path(sys.argv[1]), json.loads(sys.argv[2])
    writes = []
    write_checkpoint, plot_history = checkpoint.write_checkpoint, bertlite.plot.plot_history

    def recording_write(path, **kwargs):
        writes.append(f"checkpoint {Path(path).name}")
        return write_checkpoint(path, **kwargs)

    def recording_plot(history, path, **kwargs):
        writes.append(f"plot {Path(path).name}")
        return plot_history(history, path, **kwargs)

    checkpoint.write_checkpoint, bertlite.plot.plot_history = recording_write, recording_plot
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bertlite.train("mxnet", **options)
    from bertlite.backends.mxnet import distributed

    rank = distributed.rank()
    np.savez(out / f"weights-{rank}.npz", **result.backend.state_dict(result.model))
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "workers": distributed.world_size(),
        "main": result.backend.is_main_process(), "printed": printed.getvalue(),
        "writes": writes, "mlm": result.history.mlm_loss, "nsp": result.history.nsp_loss,
        "env": {k: os.environ.get(k) for k in ("DMLC_ROLE", "DMLC_NUM_WORKER",
                                               "DMLC_PS_ROOT_URI", "MXNET_OMP_MAX_THREADS")}}))
""")


@pytest.fixture(autouse=True)
def _mxnet_only():
    skip_unless_backend("mxnet")




def single_process(**options):
    import bertlite

    result = bertlite.train("mxnet", **{**OPTIONS, "plot": None, "verbose": False, **options})
    return result, result.backend.state_dict(result.model)


def assert_same_training(losses, weights, reference, reference_weights):
    """float32 tolerance. Adam divides by the gradient's magnitude, so an element whose
    gradient is near zero moves by up to lr whatever rounding did to it: a few such elements
    may differ by a fraction of lr, the rest agree to float32 rounding. (The attention key bias
    has a zero gradient in exact arithmetic -- it cancels in the softmax -- so it is only
    bounded.)"""
    steps, lr = OPTIONS["num_steps"], OPTIONS["lr"]
    np.testing.assert_allclose(losses[0], reference.history.mlm_loss, rtol=1e-5)
    np.testing.assert_allclose(losses[1], reference.history.nsp_loss, rtol=1e-4, atol=1e-5)
    diffs = []
    for name, value in reference_weights.items():
        diff = np.abs(weights[name] - value)
        if name.endswith("attention.W_k.bias"):
            assert diff.max() <= 2 * steps * lr, name
            continue
        # the few elements whose gradient is near zero: any difference up to the steps' lr
        loose = ~np.isclose(weights[name], value, rtol=1e-4, atol=0.01 * lr)
        assert loose.sum() <= max(1, diff.size // 1000), (name, int(loose.sum()))
        assert diff.max() <= 2 * steps * lr, name
        diffs.append(diff.ravel())
    assert np.quantile(np.concatenate(diffs), 0.999) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_workers_train_like_one_process(tmp_path, accumulate):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    options = {**OPTIONS, "accumulate": accumulate, "plot": str(tmp_path / "loss.png"),
               "checkpoint_dir": str(tmp_path / "ckpt")}
    job = run_launch_job(["--workers", "2", "--", sys.executable, str(script), str(tmp_path),
                   json.dumps(options)], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    weights = [dict(np.load(tmp_path / f"weights-{r}.npz")) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["workers"] for r in ranks] == [2, 2]
    assert [r["main"] for r in ranks] == [True, False]
    assert ranks[0]["env"]["DMLC_ROLE"] == "worker" and ranks[0]["env"]["DMLC_NUM_WORKER"] == "2"
    assert ranks[0]["env"]["DMLC_PS_ROOT_URI"] == "127.0.0.1"
    # only worker 0 prints, plots and writes the checkpoint
    assert "MLM loss" in ranks[0]["printed"] and ranks[1]["printed"] == ""
    assert ranks[0]["writes"] == ["checkpoint step-000004", "plot loss.png"]
    assert ranks[1]["writes"] == []
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000004"]
    # every worker returns the global batch's losses and holds the same weights
    assert ranks[0]["mlm"] == ranks[1]["mlm"] and ranks[0]["nsp"] == ranks[1]["nsp"]
    for name, value in weights[0].items():
        np.testing.assert_array_equal(weights[1][name], value, err_msg=name)
    # ... those of one process training on the whole global batch
    reference, reference_weights = single_process()
    assert_same_training((ranks[0]["mlm"], ranks[0]["nsp"]), weights[0], reference,
                         reference_weights)
    import bertlite

    saved = bertlite.load(tmp_path / "ckpt", backend="mxnet")
    saved_weights = saved.backend.state_dict(saved.model)
    for name, value in weights[0].items():
        np.testing.assert_array_equal(saved_weights[name], value, err_msg=name)


@pytest.mark.slow
def test_the_documented_cli_launch(tmp_path):
    """``python -m bertlite.launch --workers 2 -- bertlite pretrain --backend mxnet ...``: one
    summary, one checkpoint. (The presets train with dropout, whose masks depend on how the
    batch is divided, so this run is not compared with one process: the test above is.)"""
    ckpt = tmp_path / "ckpt"
    job = run_launch_job(["--workers", "2", "--", sys.executable, "-m", "bertlite", "pretrain",
                   "--backend", "mxnet", "--corpus", "sample", "--batch-size", "16",
                   "--max-len", "32", "--steps", "3", "--seed", "5", "--no-plot",
                   "--no-progress", "--checkpoint-dir", str(ckpt)], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("MLM loss") == 1, job.stdout
    assert "sentence pairs/sec on [cpu(0)]" in job.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000003"]
    history = json.loads((ckpt / "step-000003" / "trainer.json").read_text())["history"]
    assert history["step"] == [1, 2, 3] and np.isfinite(history["mlm_loss"]).all()
    # the first loss is near chance, ln |V|, for the global batch (not half of it)
    vocab = (ckpt / "step-000003" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert abs(history["mlm_loss"][0] - np.log(len(vocab))) < 1.0


@pytest.mark.slow
def test_a_failing_worker_fails_the_job(tmp_path):
    job = run_launch_job(["--workers", "2", "--", sys.executable, "-c", "import sys; sys.exit(3)"],
                  tmp_path)
    assert job.returncode == 3
    assert "a worker exited with status 3" in job.stderr


@pytest.mark.slow
def test_a_worker_failing_alone_ends_the_job(tmp_path):
    """Worker 0 fails after training (its plot cannot be written: the plot's folder, fine when
    checked before training, is replaced by a file while it trains): it must not wait for the
    others at the kvstore's exit barrier; it exits, and the launcher stops the rest."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    out.mkdir()

    def replace_folder_once_training() -> None:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (ck / "step-000001").is_dir() and time.monotonic() < deadline:
            time.sleep(0.005)
        out.rmdir()
        out.write_text("now a file")

    saboteur = threading.Thread(target=replace_folder_once_training, daemon=True)
    saboteur.start()
    job = run_launch_job(["--workers", "2", "--", sys.executable, "-m", "bertlite", "pretrain",
                   "--backend", "mxnet", "--corpus", "sample", "--batch-size", "8",
                   "--max-len", "32", "--steps", "8", "--no-progress", "--checkpoint-dir",
                   str(ck), "--checkpoint-every", "1", "--plot", str(out / "loss.png")],
                  tmp_path)
    saboteur.join(timeout=5)
    assert job.returncode == 1, job.stderr[-3000:]
    assert "a worker exited with status 1" in job.stderr
    assert "training finished, but the plot could not be written" in job.stderr
    assert job.stdout.count("MLM loss") == 1


def test_launcher_environment_and_usage(capsys):
    env = launch.dmlc_env("worker", workers=2, servers=1, port=9123, base={})
    assert env == {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_URI": "127.0.0.1",
                   "DMLC_PS_ROOT_PORT": "9123", "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "2",
                   "DMLC_NODE_HOST": "127.0.0.1", "DMLC_INTERFACE": "lo",
                   "MXNET_OMP_MAX_THREADS": env["MXNET_OMP_MAX_THREADS"]}
    assert int(env["MXNET_OMP_MAX_THREADS"]) >= 1
    assert "MXNET_OMP_MAX_THREADS" not in launch.dmlc_env(
        "worker", workers=2, servers=1, port=1, base={"OMP_NUM_THREADS": "3"})
    assert launch.dmlc_env("server", workers=2, servers=1, port=1, base={})["DMLC_ROLE"] \
        == "server"
    assert launch.main(["--workers", "2"]) == 2
    assert "no worker command given" in capsys.readouterr().err
    assert launch.main(["--workers", "0", "--", "true"]) == 2
    from bertlite.cli import main as cli_main

    assert cli_main(["launch-mxnet", "--workers", "2"]) == 2
    assert "bertlite launch-mxnet: error: no worker command given" in capsys.readouterr().err
