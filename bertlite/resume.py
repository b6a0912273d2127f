"""Checkpoints during training: writing the run's checkpoints and resuming from the latest,
with the settings a resume may not change (data) or changes only when asked (optimizer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertlite import checkpoint as ckpt
from bertlite.errors import CheckpointError
from bertlite.optim import OptimizerSettings
from bertlite.trainer import History, TrainState

if TYPE_CHECKING:
    from bertlite.api import TrainResult

__all__ = ["check_writable", "resume_state", "write_training_checkpoint"]


def check_writable(directory: Path) -> None:
    """Fail before training, naming the folder, when checkpoints could not be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {err.strerror or err}; "
                              "choose another checkpoint_dir") from None


def write_training_checkpoint(directory: Path, result: TrainResult, state: TrainState,
                              optimizer: Any, settings: OptimizerSettings,
                              training: dict[str, Any], keep: int) -> Path:
    """The run's checkpoint at ``state.step`` (model, optimizer state, data cursor, history),
    then the run's older ones beyond ``keep`` pruned; returns its folder."""
    be = result.backend
    arrays = dict(be.optimizer_state(optimizer))
    ckpt.write_checkpoint(
        directory / f"step-{state.step:06d}", config=result.config, vocab=result.vocab,
        weights=be.state_dict(result.model), backend_name=be.name, training=training,
        trainer_arrays=arrays,
        trainer_state={"step": state.step, "epoch": state.epoch,
                       "batch_index": state.batch_index, "optimizer": settings.to_dict(),
                       "history": state.history.to_dict(), "overrides": state.overrides})
    ckpt.prune_checkpoints(directory, keep, training.get("run"))
    return directory / f"step-{state.step:06d}"


#: data settings a resume can never change (the data cursor and the masks depend on them)
_DATA_SETTINGS = ("batch_size", "max_len", "seed", "masking", "tokenizer", "whole_word_mask",
                  "corpus_digest")
_OPTIMIZER_SETTINGS = ("lr", "optimizer", "betas", "eps", "weight_decay", "clip_norm",
                       "schedule", "warmup_steps")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _setting_changes(saved: dict[str, Any], saved_opt: dict[str, Any], training: dict[str, Any],
                     settings: OptimizerSettings) -> tuple[list[tuple], list[tuple]]:
    """(data settings, overridable settings) that differ: ``(name, checkpoint's, this run's)``."""
    defaults = {"tokenizer": "word", "whole_word_mask": False}  # checkpoints from before them
    data = [(key, saved.get(key, defaults.get(key)), training.get(key)) for key in _DATA_SETTINGS
            if saved.get(key, defaults.get(key)) != training.get(key)]
    new_opt = settings.to_dict()
    other = [(key, _plain(saved_opt.get(key)), _plain(new_opt[key]))
             for key in _OPTIMIZER_SETTINGS if _plain(saved_opt.get(key)) != _plain(new_opt[key])]
    if "constant" not in (saved_opt.get("schedule"), settings.schedule):  # it shapes the decay
        if saved_opt.get("total_steps") != settings.total_steps:
            other.append(("num_steps", saved_opt.get("total_steps"), settings.total_steps))
    if saved.get("precision", "float32") != training["precision"]:
        other.append(("precision", saved.get("precision", "float32"), training["precision"]))
    return data, other


def resume_state(directory: Path, result: TrainResult, optimizer: Any,
                 training: dict[str, Any], settings: OptimizerSettings,
                 overrides: frozenset[str]) -> TrainState | None:
    """The training state of the latest checkpoint in ``directory`` loaded into the model and
    optimizer (None when there is none); refuses other data settings, and other optimizer or
    precision settings unless ``overrides`` names them (recorded in the state)."""
    if not ckpt.list_checkpoints(directory):
        return None
    found = ckpt.read_checkpoint(directory, with_trainer=True)
    if found["config"] != result.config:
        raise CheckpointError(f"{found['path']} holds a model of another config "
                              f"({found['config']}); use a new checkpoint_dir or the same config")
    meta = found["trainer_state"]
    saved = found["meta"].get("training", {})
    data, other = _setting_changes(saved, meta.get("optimizer") or saved.get("optimizer", {}),
                                   training, settings)
    listed = "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in data + other)
    if data:
        raise CheckpointError(f"{found['path']} was trained with other data settings ({listed}); "
                              f"{', '.join(k for k, _, _ in data)} cannot change on resume: "
                              "resume with the checkpoint's settings or use a new checkpoint_dir")
    refused = [key for key, _, _ in other if key not in overrides]
    if refused:
        names = ",".join(key for key, _, _ in other)
        raise CheckpointError(f"{found['path']} was trained with other settings ({listed}); "
                              "resume with the checkpoint's settings, or accept the new ones "
                              f"with override_resume=[{', '.join(map(repr, names.split(',')))}] "
                              f"(--override-resume {names})")
    step = meta["step"]
    if step > result.num_steps:
        raise CheckpointError(f"{found['path']} is at step {step}, beyond num_steps "
                              f"{result.num_steps}; resume with num_steps >= {step}")
    be = result.backend
    be.load_state_dict(result.model, found["weights"])
    be.load_optimizer_state(optimizer, found["trainer_arrays"])
    recorded = meta.get("overrides", [])
    recorded = list(recorded) if isinstance(recorded, list) else []
    recorded += [{"step": step, "name": key, "checkpoint": old, "now": new}
                 for key, old, new in other]
    return TrainState(step=step, epoch=meta["epoch"], batch_index=meta["batch_index"],
                      history=History.from_dict(meta["history"]), overrides=recorded)
