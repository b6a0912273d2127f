"""Reliability of a run (issue 14, classes 2, 3, 6 and resume overrides): every argument is
checked before any work, outputs written after training are checked up front and written model
first; SIGTERM/SIGINT stop cleanly after a step with a checkpoint, exit 143/130 and resume to
the uninterrupted run's losses; a resume with other settings is refused unless overridden; the
encoder takes text or tokens only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, gloo_rank_env

import bertlite
from bertlite import checkpoint as ckpt
from bertlite.cli import main as cli_main

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.0,
             max_len=32)
BASE = dict(corpus="sample", config=SMALL, batch_size=8, max_len=32, num_steps=2,
            lr=0.01, warmup_steps=0,  # the book's, given (the sample's own: tests/test_demo.py)
            progress=False, verbose=False)
CLI_BASE = ["pretrain", "--corpus", "sample", "--steps", "2", "--batch-size", "8", "--max-len",
            "32", "--no-progress"]

#: (id, API keywords, CLI arguments or None, expected message). "{tmp}" is the test's folder,
#: in which "a-file" is a regular file and "a-folder" a folder of the user's files.
BAD_ARGUMENTS = [
    ("weight-decay-str", {"weight_decay": "0.1"}, ["--weight-decay", "-1"],
     "weight_decay must be a number >= 0"),
    ("clip-norm-str", {"clip_norm": "1"}, ["--clip-norm", "0"],
     "clip_norm must be a positive number"),
    ("warmup-str", {"warmup_steps": "2"}, ["--warmup-steps", "-1"],
     "warmup_steps must be an integer >= 0"),
    ("max-time-str", {"max_time": "10m"}, ["--max-time=-5m"],
     "max_time must be a positive number"),
    ("keep-checkpoints-str", {"keep_checkpoints": "3"}, ["--keep-checkpoints", "-1"],
     r"keep_checkpoints \(0 keeps all\) must be an integer >= 0"),
    ("corpus-none", {"corpus": None}, None, "corpus must be a path"),
    ("seed-negative", {"seed": -1}, ["--seed", "-1"], "seed must be an integer >= 0"),
    ("lr-nan", {"lr": float("nan")}, ["--lr", "nan"], "lr must be a positive number"),
    ("batch-size-float", {"batch_size": 8.0}, None, "batch_size must be a positive integer"),
    ("steps-bool", {"num_steps": True}, None, "num_steps must be a positive integer"),
    ("eval-every-zero", {"eval_every": 0}, ["--eval-every", "0"],
     "eval_every must be a positive integer"),
    ("optimizer-unknown", {"optimizer": "sgd"}, None, "optimizer must be one of"),
    ("progress-str", {"progress": "no"}, None, "progress must be True or False"),
    ("plot-format", {"plot": "{tmp}/loss.txt"}, ["--plot", "{tmp}/loss.txt"],
     "matplotlib cannot write txt"),
    ("plot-no-extension", {"plot": "{tmp}/loss"}, ["--plot", "{tmp}/loss"],
     "without an extension"),
    ("plot-parent-is-file", {"plot": "{tmp}/a-file/loss.png"},
     ["--plot", "{tmp}/a-file/loss.png"], "a-file is a file"),
    ("plot-is-folder", {"plot": "{tmp}/a-folder"}, ["--plot", "{tmp}/a-folder"], "is a folder"),
    ("plot-name-too-long", {"plot": "{tmp}/" + "x" * 300 + ".png"},
     ["--plot", "{tmp}/" + "x" * 300 + ".png"], "cannot be written: File name too long"),
    ("save-name-too-long", {"save": "{tmp}/" + "x" * 300},
     ["--save", "{tmp}/" + "x" * 300], "cannot be written: File name too long"),
    ("resume-without-dir", {"resume": True}, ["--resume"], "resume=True needs checkpoint_dir"),
    ("save-in-checkpoint-dir", {"checkpoint_dir": "{tmp}/ck", "save": "{tmp}/ck/final"},
     ["--checkpoint-dir", "{tmp}/ck", "--save", "{tmp}/ck/final"],
     "is inside the checkpoint directory"),
    ("save-is-checkpoint-dir", {"checkpoint_dir": "{tmp}/ck", "save": "{tmp}/ck"},
     ["--checkpoint-dir", "{tmp}/ck", "--save", "{tmp}/ck"], "is the checkpoint directory"),
    ("save-is-a-file", {"save": "{tmp}/a-file"}, ["--save", "{tmp}/a-file"], "is a file"),
    ("save-user-folder", {"save": "{tmp}/a-folder"}, ["--save", "{tmp}/a-folder"],
     "not a bertlite checkpoint"),
    ("save-holds-checkpoint-dir", {"checkpoint_dir": "{tmp}/out/ck", "save": "{tmp}/out"},
     ["--checkpoint-dir", "{tmp}/out/ck", "--save", "{tmp}/out"], "holds the checkpoint"),
    ("dropout-one", {"dropout": 1.0}, ["--dropout", "1"], r"dropout must be a probability"),
    ("eval-data-without-data", {"eval_data": "{tmp}/a-folder"}, None,
     "eval_data needs data="),
    ("override-data-setting", {"checkpoint_dir": "{tmp}/ck", "resume": True,
                               "override_resume": ["batch_size"]},
     ["--checkpoint-dir", "{tmp}/ck", "--resume", "--override-resume", "batch_size"],
     "'batch_size' cannot be overridden"),
    ("override-without-resume", {"override_resume": ["lr"]}, ["--override-resume", "lr"],
     "only applies to a resumed run"),
]


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return value


def _user_files(tmp: Path) -> dict[str, bytes]:
    (tmp / "a-file").write_bytes(b"the user's file")
    (tmp / "a-folder").mkdir()
    (tmp / "a-folder" / "notes.txt").write_bytes(b"the user's notes")
    return {str(p.relative_to(tmp)): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}


def _files(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_through_the_api(case, backend_name, tmp_path, monkeypatch):
    _, kwargs, _, message = case
    before = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    kwargs = {"plot": str(tmp_path / "loss.png"), **{k: _fill(v, tmp_path)
                                                      for k, v in kwargs.items()}}
    with pytest.raises(bertlite.errors.BertliteError, match=message) as info:
        bertlite.train(backend_name, **{**BASE, **kwargs})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, (bertlite.OptionError, bertlite.errors.CheckpointError))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    assert _files(tmp_path) == before  # nothing written, nothing touched


@pytest.mark.parametrize("case", [c for c in BAD_ARGUMENTS if c[2] is not None],
                         ids=[c[0] for c in BAD_ARGUMENTS if c[2] is not None])
def test_bad_argument_through_the_cli(case, backend_name, tmp_path, monkeypatch, capsys):
    _, _, args, message = case
    before = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    status = cli_main([*CLI_BASE, "--backend", backend_name, *_fill(args, tmp_path)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    assert _files(tmp_path) == before


PLAN_CASES = [
    (["--devices", "0"], 2, "--devices must be a positive integer, got 0"),
    (["--batch-size", "-5"], 2, "--batch-size must be a positive integer, got -5"),
    (["--max-len", "0"], 2, "--max-len must be a positive integer"),
    (["--vocab-size", "0"], 2, "--vocab-size must be a positive integer"),
    (["--memory", "-1"], 2, "--memory must be a positive number"),
    (["--devices", "2", "--batch-size", "8"], 0, "over 2 device(s)"),
]


@pytest.mark.parametrize("args,status,message", PLAN_CASES, ids=[" ".join(c[0]) for c in
                                                                 PLAN_CASES])
def test_plan_arguments(args, status, message, capsys):
    assert cli_main(["plan", *args]) == status
    out = capsys.readouterr()
    assert message in (out.err if status else out.out)
    if status:
        assert "fits" not in out.out and "Traceback" not in out.err


_MODELS: dict[str, bertlite.TrainResult] = {}


def _model(backend_name: str) -> bertlite.TrainResult:
    if backend_name not in _MODELS:
        _MODELS[backend_name] = bertlite.train(backend_name, **{**BASE, "num_steps": 1},
                                               plot=None)
    return _MODELS[backend_name]


#: (id, tokens_a, tokens_b, the message of the TypeError)
BAD_ENCODER_INPUTS = [
    ("ids", [1, 2, 3], None, "tokens_a must be a text .* holds int 1"),
    ("bytes", b"a crane", None, "got bytes b'a crane'; decode bytes first"),
    ("none", None, None, "tokens_a must be a text .* got NoneType"),
    ("float", 3.5, None, "got float 3.5"),
    ("mixed-list", ["a", 2], None, "holds int 2"),
    ("set", {"a", "crane"}, None, "got set"),
    ("array", np.array(["a", "crane"]), None, "got ndarray"),
    ("bytes-in-list", [b"a"], None, "holds bytes b'a'; decode bytes first"),
    ("bad-b", "a crane", [1], "tokens_b must be a text .* holds int 1"),
    ("bytes-b", "a crane", b"flies", "tokens_b .* got bytes"),
]


@pytest.mark.parametrize("case", BAD_ENCODER_INPUTS, ids=[c[0] for c in BAD_ENCODER_INPUTS])
def test_encoder_refuses_what_is_not_text(case, backend_name):
    _, tokens_a, tokens_b, message = case
    with pytest.raises(TypeError, match=message):
        bertlite.get_bert_encoding(_model(backend_name), tokens_a, tokens_b)


def test_encoder_takes_text_list_and_tuple_alike(backend_name):
    model = _model(backend_name)
    text = bertlite.get_bert_encoding(model, "the crane flies", "it is big")
    listed = bertlite.get_bert_encoding(model, ["the", "crane", "flies"], ("it", "is", "big"))
    assert text.shape == (1, 9, SMALL["num_hiddens"])
    np.testing.assert_array_equal(text, listed)


# -- resuming with other settings ----------------------------------------------------------

_BASE_RUNS: dict[str, Path] = {}


def _checkpointed(backend_name: str, tmp_path: Path, **changes) -> Path:
    """A copy of a 2-step run's checkpoint directory (trained once per backend)."""
    if backend_name not in _BASE_RUNS:
        folder = Path(os.environ["BERTLITE_CACHE"]).parent / f"resume-base-{backend_name}"
        shutil.rmtree(folder, ignore_errors=True)
        bertlite.train(backend_name, **{**BASE, "plot": None, "checkpoint_dir": folder,
                                        **changes})
        _BASE_RUNS[backend_name] = folder
    target = tmp_path / "ck"
    shutil.copytree(_BASE_RUNS[backend_name], target)
    return target


#: (id, keywords of the resumed run, override_resume, expected message or None if accepted)
RESUME_CASES = [
    ("lr", {"lr": 0.005}, None, r"\(lr 0\.01 -> 0\.005\).*--override-resume lr\)"),
    ("several", {"lr": 0.005, "weight_decay": 0.1, "optimizer": "adamw"}, None,
     r"lr 0\.01 -> 0\.005; optimizer 'adam' -> 'adamw'; weight_decay 0\.0 -> 0\.1"),
    ("schedule", {"schedule": "cosine"}, None, "schedule 'constant' -> 'cosine'"),
    ("clip-norm", {"clip_norm": 1.0}, None, "clip_norm None -> 1.0"),
    ("warmup", {"warmup_steps": 2}, None, "warmup_steps 0 -> 2"),
    ("batch-size", {"batch_size": 4}, ["batch_size"], "'batch_size' cannot be overridden"),
    ("batch-size-no-override", {"batch_size": 4}, None,
     r"batch_size 8 -> 4\); batch_size cannot change on resume"),
    ("seed", {"seed": 3}, None, "seed 0 -> 3"),
    ("override-another", {"lr": 0.005}, ["weight_decay"], "--override-resume lr"),
    ("beyond-num-steps", {"num_steps": 1}, None, "at step 2, beyond num_steps 1"),
    ("lr-overridden", {"lr": 0.005}, ["lr"], None),
    ("longer-constant-run", {}, None, None),
]


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_with_other_settings(case, backend_name, tmp_path):
    _, changes, overrides, message = case
    folder = _checkpointed(backend_name, tmp_path)
    run = {**BASE, "plot": None, "checkpoint_dir": folder, "resume": True, "num_steps": 4,
           **changes}
    if message is not None:
        with pytest.raises(bertlite.errors.BertliteError, match=message):
            bertlite.train(backend_name, **run, override_resume=overrides)
        assert [s for s, _ in ckpt.list_checkpoints(folder)] == [2]  # nothing written
        return
    result = bertlite.train(backend_name, **run, override_resume=overrides)
    assert result.history.step == [1, 2, 3, 4]
    state = ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]
    expected = [{"step": 2, "name": "lr", "checkpoint": 0.01, "now": 0.005}] if overrides else []
    assert state["overrides"] == expected
    assert state["optimizer"]["lr"] == run.get("lr", 0.01)
    assert result.history.lr == [0.01, 0.01] + [run.get("lr", 0.01)] * 2


def test_resume_override_through_the_cli(backend_name, tmp_path, capsys):
    args = [*CLI_BASE, "--backend", backend_name, "--checkpoint-dir", str(tmp_path / "ck"),
            "--no-plot"]
    assert cli_main(args) == 0
    args = [*args, "--steps", "3", "--resume", "--lr", "0.02", "--weight-decay", "0.5"]
    assert cli_main(args) == 2
    assert "--override-resume lr,weight_decay)" in capsys.readouterr().err
    assert cli_main([*args, "--override-resume", "lr", "--override-resume", "weight_decay"]) == 0
    state = ckpt.read_checkpoint(tmp_path / "ck", with_trainer=True)["trainer_state"]
    assert state["step"] == 3
    assert [(o["name"], o["now"]) for o in state["overrides"]] == [("lr", 0.02),
                                                                  ("weight_decay", 0.5)]


# -- outputs after training ----------------------------------------------------------------

def test_output_failing_after_training_keeps_the_model(backend_name, tmp_path):
    """The plot's folder is replaced by a file while training runs (it was fine when checked):
    the model is still saved, first, and the error says where."""
    out = tmp_path / "out"
    out.mkdir()
    ck = tmp_path / "ck"

    def replace_folder_once_training() -> None:
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(ck) and time.monotonic() < deadline:
            time.sleep(0.01)
        out.rmdir()
        out.write_text("now a file")

    saboteur = threading.Thread(target=replace_folder_once_training)
    saboteur.start()
    try:
        with pytest.raises(bertlite.OutputError, match=r"the plot could not be written to .*"
                           r"the trained model is in .*saved") as info:
            bertlite.train(backend_name, **{**BASE, "num_steps": 6}, checkpoint_dir=ck,
                           checkpoint_every=1, plot=out / "loss.png", save=tmp_path / "saved")
    finally:
        saboteur.join()
    loaded = bertlite.load(tmp_path / "saved", backend=backend_name)
    result = info.value.result
    assert result.history.step == list(range(1, 7))
    for name, value in result.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)


# -- signals -------------------------------------------------------------------------------

def _pretrain(backend_name: str, folder: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bertlite", "pretrain", "--backend", backend_name,
            "--corpus", "sample", "--config", "tiny", "--steps", str(steps), "--batch-size",
            "16", "--max-len", "32", "--checkpoint-dir", str(folder), "--checkpoint-every", "5",
            "--keep-checkpoints", "2", "--resume", "--no-plot", "--no-progress", "--seed", "5",
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


def _wait_for_training(proc: subprocess.Popen, folder: Path, before: int) -> None:
    """Until a checkpoint newer than ``before`` appears (the run is in its training loop)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if max([s for s, _ in ckpt.list_checkpoints(folder)], default=0) > before:
            return
        time.sleep(0.01)


def _history(folder: Path) -> dict:
    return ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]["history"]


_UNINTERRUPTED: dict[tuple[str, int], dict] = {}


def _uninterrupted(backend_name: str, steps: int) -> dict:
    """The history of ``_pretrain``'s command never interrupted (run once per backend: the
    SIGTERM and SIGINT cases compare with the same run)."""
    if (backend_name, steps) not in _UNINTERRUPTED:
        folder = Path(os.environ["BERTLITE_CACHE"]).parent / f"uninterrupted-{backend_name}"
        shutil.rmtree(folder, ignore_errors=True)
        clean = subprocess.run(_pretrain(backend_name, folder, steps), capture_output=True,
                               text=True, timeout=600, env=_env())
        assert clean.returncode == 0, clean.stderr
        _UNINTERRUPTED[backend_name, steps] = _history(folder)
    return _UNINTERRUPTED[backend_name, steps]


@pytest.mark.slow
@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_then_resume_equals_uninterrupted(signum, status, backend_name,
                                                               tmp_path):
    """Signalled at random moments of the training loop, the run finishes its step, writes a
    checkpoint of it, names it in one line and exits 143/130; resumed, its losses equal those
    of a run never interrupted (dropout on, as by default)."""
    steps = 30
    reference = _uninterrupted(backend_name, steps)
    rng = np.random.default_rng(int(signum))
    folder = tmp_path / "stopped"
    stops = 0
    for _ in range(3):
        before = max([s for s, _ in ckpt.list_checkpoints(folder)], default=0)
        proc = subprocess.Popen(_pretrain(backend_name, folder, steps), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_training(proc, folder, before)
        time.sleep(float(rng.uniform(0.0, 0.1)))
        if proc.poll() is None:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:  # it finished before the signal: nothing left to stop
            break
        stops += 1
        assert proc.returncode == status, err
        assert "Traceback" not in err
        step = ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]["step"]
        line = [x for x in err.splitlines() if x.startswith("bertlite: stopped by")]
        assert line == [f"bertlite: stopped by {signum.name} after step {step} of {steps}: "
                        f"checkpoint {folder / f'step-{step:06d}'}; resume with the same "
                        "command and --resume (resume=True)"], err
        assert _history(folder)["step"] == list(range(1, step + 1))
    assert stops >= 2
    final = subprocess.run(_pretrain(backend_name, folder, steps), capture_output=True,
                           text=True, timeout=600, env=_env())
    assert final.returncode == 0, final.stderr
    resumed = _history(folder)
    assert resumed["step"] == list(range(1, steps + 1))
    assert resumed["mlm_loss"] == reference["mlm_loss"]  # exactly: same steps, same dropout
    assert resumed["nsp_loss"] == reference["nsp_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, -signal.SIGTERM),
                                           (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_second_signal_stops_at_once(signum, status, backend_name, tmp_path):
    """The second signal does not wait for the step: no stop checkpoint, no "stopped" line.
    (A repeat within BERTLITE_SIGNAL_WINDOW seconds counts as a copy of the first; 0 here.)"""
    folder = tmp_path / "ck"
    proc = subprocess.Popen(_pretrain(backend_name, folder, 400, "--batch-size", "256",
                                      "--max-len", "64"),
                            env={**_env(), "BERTLITE_SIGNAL_WINDOW": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(proc, folder, 0)
    proc.send_signal(signum)
    line = ""
    while "received, stopping after the current step" not in line:
        line = proc.stderr.readline()
        assert line, "no line announced the stop request"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "stopped by" not in err
    steps = [s for s, _ in ckpt.list_checkpoints(folder)]
    assert all(s % 5 == 0 for s in steps)  # only the periodic checkpoints


@pytest.mark.slow
def test_a_copy_of_the_signal_is_the_same_request(backend_name, tmp_path):
    """The same signal again within a second, as a launcher forwards the SIGTERM or Ctrl-C
    its workers also got: still one clean stop with a checkpoint."""
    folder = tmp_path / "ck"
    proc = subprocess.Popen(_pretrain(backend_name, folder, 400, "--batch-size", "256",
                                      "--max-len", "64"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(proc, folder, 0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]["step"]
    assert f"stopped by SIGTERM after step {step} of 400" in err


@pytest.mark.slow
def test_signal_without_checkpoint_dir_says_nothing_was_saved(backend_name, tmp_path):
    """Without a checkpoint directory the run still stops after its step, exits 143 and says
    that nothing was saved (no plot, no --save of a half-trained model)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bertlite", "pretrain", "--backend", backend_name, "--corpus",
         "sample", "--steps", "400", "--batch-size", "16", "--max-len", "32", "--plot",
         str(tmp_path / "loss.png"), "--save", str(tmp_path / "saved")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "pretrain:" not in seen or "/400" not in seen:  # the progress bar: it trains
        chunk = proc.stderr.buffer.read1(4096).decode(errors="replace")
        assert chunk, f"no progress bar: {seen}"
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, seen + err
    assert "nothing saved (pass --checkpoint-dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- processes that train together agree on the step to stop at ----------------------------

def _ddp_worker(rank: int, world_size: int, port: int, out: str, options: dict) -> None:
    os.environ.update(gloo_rank_env(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    options = dict(options)
    signal_at = options.pop("signal_rank1_after", None)
    if signal_at is not None and rank == 1:  # only the second process gets the signal
        def send() -> None:
            folder = Path(options["checkpoint_dir"])
            while max([s for s, _ in ckpt.list_checkpoints(folder)], default=0) < signal_at:
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=send, daemon=True).start()
    record = {"rank": rank}
    try:
        result = bertlite.train("torch", **options)
        record["history"] = result.history.to_dict()
    except bertlite.TrainingInterrupted as stop:
        record.update(stopped_at=stop.step, checkpoint=str(stop.checkpoint),
                      exit_code=stop.exit_code)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def _spawn(tmp_path: Path, options: dict) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out), options), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_step(backend_name, tmp_path):
    """SIGTERM to one of two DDP processes: both stop after the same step, rank 0 writes its
    checkpoint, and the resumed run ends with the losses of an uninterrupted one."""
    if backend_name != "torch":
        pytest.skip("DistributedDataParallel is the torch backend's (the MXNet kvstore stop "
                    "shares Backend.any_process but is not tested here)")
    options = {**BASE, "config": {**SMALL, "dropout": 0.1}, "batch_size": 16, "num_steps": 14,
               "plot": None, "checkpoint_every": 2, "keep_checkpoints": 2, "resume": True}
    reference = _spawn(tmp_path, {**options, "checkpoint_dir": str(tmp_path / "clean")})
    folder = tmp_path / "stopped"
    ranks = _spawn(tmp_path, {**options, "checkpoint_dir": str(folder),
                              "signal_rank1_after": 4})
    assert {r.get("stopped_at") for r in ranks} != {None}, ranks
    step = ranks[0]["stopped_at"]
    assert 4 <= step < 14 and ranks[1]["stopped_at"] == step
    assert [r["exit_code"] for r in ranks] == [143, 143]
    state = ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]
    assert state["step"] == step
    assert [r["checkpoint"] for r in ranks] == [str(folder / f"step-{step:06d}")] * 2
    resumed = _spawn(tmp_path, {**options, "checkpoint_dir": str(folder)})
    for got, want in zip(resumed, reference):
        assert got["history"]["step"] == list(range(1, 15))
        assert got["history"]["mlm_loss"] == want["history"]["mlm_loss"]
        assert got["history"]["nsp_loss"] == want["history"]["nsp_loss"]


#: an MXNet dist_sync worker: bertlite.train; the worker of rank 1 sends itself SIGTERM once
#: a checkpoint of step ``signal_after`` or later exists
KVSTORE_WORKER = """
import json, os, signal, sys, threading, time
from pathlib import Path

import bertlite
from bertlite import checkpoint as ckpt
from bertlite.backends.mxnet import distributed

out, options = Path(sys.argv[1]), json.loads(sys.argv[2])
signal_after = options.pop("signal_after", None)


def send():
    folder = Path(options["checkpoint_dir"])
    while max([s for s, _ in ckpt.list_checkpoints(folder)], default=0) < signal_after:
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)


record = {}
try:
    if signal_after is not None and distributed.rank() == 1:
        threading.Thread(target=send, daemon=True).start()
    result = bertlite.train("mxnet", **options)
    record["history"] = result.history.to_dict()
except bertlite.TrainingInterrupted as stop:
    record.update(stopped_at=stop.step, exit_code=stop.exit_code,
                  checkpoint=str(stop.checkpoint))
(out / f"rank{distributed.rank()}.json").write_text(json.dumps(record))
"""


def _kvstore_job(tmp_path: Path, options: dict) -> list[dict]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(KVSTORE_WORKER)
    env = {**_env(), "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-m", "bertlite.launch", "--timeout", "300",
                             "--workers", "2", "--", sys.executable, str(script), str(out),
                             json.dumps(options)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the MXNet job did not end in 360 s")
    assert proc.returncode == 0, err
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_kvstore_workers_stop_at_the_same_step(backend_name, tmp_path):
    """SIGTERM to one of two MXNet dist_sync workers: both stop after the same step, worker 0
    writes the checkpoint, and the resumed job ends with the uninterrupted job's losses."""
    if backend_name != "mxnet":
        pytest.skip("the dist_sync kvstore is the MXNet backend's")
    options = {**BASE, "config": {**SMALL, "dropout": 0.1}, "batch_size": 16, "num_steps": 14,
               "plot": None, "checkpoint_every": 2, "keep_checkpoints": 2, "resume": True}
    reference = _kvstore_job(tmp_path, {**options, "checkpoint_dir": str(tmp_path / "clean")})
    folder = tmp_path / "stopped"
    ranks = _kvstore_job(tmp_path, {**options, "checkpoint_dir": str(folder),
                                    "signal_after": 4})
    step = ranks[0].get("stopped_at")
    assert step is not None and 4 <= step < 14 and ranks[1]["stopped_at"] == step, ranks
    assert [r["exit_code"] for r in ranks] == [143, 143]
    assert ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]["step"] == step
    resumed = _kvstore_job(tmp_path, {**options, "checkpoint_dir": str(folder)})
    for got, want in zip(resumed, reference):
        assert got["history"]["step"] == list(range(1, 15))
        assert got["history"]["mlm_loss"] == want["history"]["mlm_loss"]
        assert got["history"]["nsp_loss"] == want["history"]["nsp_loss"]


@pytest.mark.slow
def test_torchrun_job_signalled_whole_stops_cleanly(backend_name, tmp_path):
    """SIGTERM to the whole torchrun job (as a scheduler sends it): torchrun forwards a copy to
    its workers, which got one already; they stop once, cleanly, after the same step."""
    if backend_name != "torch":
        pytest.skip("torchrun is the torch backend's launcher")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) \
        or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    folder = tmp_path / "ck"
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "bertlite", "pretrain",
         "--backend", "torch", "--corpus", "sample", "--steps", "400", "--batch-size", "16",
         "--max-len", "32", "--no-plot", "--no-progress", "--checkpoint-dir", str(folder),
         "--checkpoint-every", "5"],
        env={**_env(), "GLOO_SOCKET_IFNAME": "lo"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_training(proc, folder, 0)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    step = ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]["step"]
    stops = [x for x in err.splitlines() if x.startswith("bertlite: stopped by")]
    assert stops == [f"bertlite: stopped by SIGTERM after step {step} of 400: checkpoint "
                     f"{folder / f'step-{step:06d}'}; resume with the same command and --resume "
                     "(resume=True)"], err[-3000:]
    assert _history(folder)["step"] == list(range(1, step + 1))


@pytest.mark.slow
def test_launcher_signalled_stops_the_mxnet_job_cleanly(backend_name, tmp_path):
    """SIGTERM to ``bertlite.launch`` alone (the job's main process, as a scheduler sends it):
    the launcher passes it on and waits; both workers stop after the same step with a
    checkpoint, the launcher exits 143, and ``--resume`` goes on from that step."""
    if backend_name != "mxnet":
        pytest.skip("bertlite.launch starts MXNet dist_sync jobs")
    folder = tmp_path / "ck"
    command = [sys.executable, "-m", "bertlite.launch", "--timeout", "300", "--workers", "2",
               "--", sys.executable, "-m", "bertlite", "pretrain", "--backend", "mxnet",
               "--corpus", "sample", "--batch-size", "16", "--max-len", "32", "--no-plot",
               "--no-progress", "--checkpoint-dir", str(folder), "--checkpoint-every", "5"]
    env = {**_env(), "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([*command, "--steps", "400"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_training(proc, folder, 0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    step = ckpt.read_checkpoint(folder, with_trainer=True)["trainer_state"]["step"]
    assert 5 <= step < 400
    assert any(line.startswith(f"bertlite: stopped by SIGTERM after step {step} of 400")
               for line in err.splitlines()), err[-3000:]
    assert _history(folder)["step"] == list(range(1, step + 1))
    resumed = subprocess.run([*command, "--steps", str(step + 2), "--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _history(folder)["step"] == list(range(1, step + 3))
