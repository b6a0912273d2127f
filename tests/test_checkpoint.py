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


def test_round_trip(tmp_path):
    write(tmp_path / "c", training={"seed": 0},
          trainer_arrays={"step": np.array(3)}, trainer_state={"step": 3})
    got = ckpt.read_checkpoint(tmp_path / "c", with_trainer=True)
    assert got["config"] == CONFIG and got["vocab"] == VOCAB
    assert all(np.array_equal(v, got["weights"][k]) for k, v in init_params(CONFIG, 0).items())
    assert got["trainer_state"] == {"step": 3} and int(got["trainer_arrays"]["step"]) == 3
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["format"] == ckpt.FORMAT_VERSION and meta["backend"] == "torch"


def test_latest_of_a_directory_and_pruning(tmp_path):
    for step in (2, 4, 6):
        write(tmp_path / f"step-{step:06d}")
    (tmp_path / ".step-000008.tmp-abc").mkdir()  # a write that was killed half-way
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-000006"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write(tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_arrays", explode)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:200]), "truncated or not a safetensors"),
    (lambda d: (d / "vocab.txt").write_text("<unk>\na\n"), "has 2 tokens but the config"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"format": 99, "model": {}})),
     "format 99, newer than this bertlite"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {"format": 1, "model": {**CONFIG.to_dict(), "num_hiddens": 16}})),
     "do not match the config"),
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
