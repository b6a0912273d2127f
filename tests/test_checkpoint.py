"""The checkpoint format itself (numpy only): atomic writes and clear errors for bad folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertlite import checkpoint as ckpt
from bertlite.config import BERTConfig
from bertlite.data.vocab import Vocab
from bertlite.errors import CheckpointError
from bertlite.params import init_params

CONFIG = BERTConfig(vocab_size=9, num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_layers=1,
                    max_len=12)
VOCAB = Vocab.from_tokens(["<unk>", "<pad>", "<mask>", "<cls>", "<sep>", "a", "b", "c", "d"])


def write(path, **kwargs):
    return ckpt.write_checkpoint(path, config=CONFIG, vocab=VOCAB,
                                 weights=init_params(CONFIG, 0), backend_name="torch", **kwargs)


TRAINER_STATE = {"step": 3, "epoch": 0, "batch_index": 3, "optimizer": {},
                 "history": {"step": [1, 2, 3], "mlm_loss": [7.0, 6.5, 6.0],
                             "nsp_loss": [0.7, 0.7, 0.6], "lr": [0.01] * 3, "pairs": 24,
                             "step_time": 0.5, "eval": [], "skipped": []}}


def test_round_trip(tmp_path):
    write(tmp_path / "c", training={"seed": 0, "num_steps": 5},
          trainer_arrays={"step": np.array(3)}, trainer_state=TRAINER_STATE)
    got = ckpt.read_checkpoint(tmp_path / "c", with_trainer=True)
    assert got["config"] == CONFIG and got["vocab"] == VOCAB
    assert all(np.array_equal(v, got["weights"][k]) for k, v in init_params(CONFIG, 0).items())
    assert got["trainer_state"] == TRAINER_STATE and int(got["trainer_arrays"]["step"]) == 3
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["format"] == ckpt.FORMAT_VERSION and meta["backend"] == "torch"


def test_latest_of_a_directory_and_pruning(tmp_path):
    write(tmp_path / "step-000001")  # before run ids: never pruned
    write(tmp_path / "step-000003", training={"run": "other"})  # another run's: never pruned
    for step in (2, 4, 6):
        write(tmp_path / f"step-{step:06d}", training={"run": "this"})
    (tmp_path / ".step-000008.tmp-abc").mkdir()  # a write that was killed half-way
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-000006"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3, 4, 6]
    assert not (tmp_path / ".step-000008.tmp-abc").exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write(tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):  # a failure other than no room: raised as it is
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt, "_save_arrays", explode)
    with pytest.raises(OSError, match="Input/output error"):
        write(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:200]), "truncated or not a safetensors"),
    (lambda d: (d / "vocab.txt").write_text("<unk>\na\n"), "vocab.txt does not match the SHA"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"format": 99, "model": {}})),
     "format 99, newer than this bertlite"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {"format": 1, "model": {**CONFIG.to_dict(), "num_hiddens": 16}})),
     "do not match the config"),  # format 1: no digests, the shapes are still checked
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()),
         "model": {**CONFIG.to_dict(), "num_hiddens": 16}})),
     "num_hiddens: config.json says 16, the weights were written for 8"),
    (lambda d: (d / "config.json").unlink(), "holds no checkpoint"),
])
def test_damaged_checkpoints_fail_clearly(tmp_path, damage, message):
    folder = write(tmp_path / "c")
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        ckpt.read_checkpoint(folder)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.read_checkpoint(tmp_path / "nowhere")
