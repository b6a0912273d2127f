"""The step-based training schedule shared by every backend: steps, not epochs; metrics; a timer
that leaves data loading out; the d2l-style summary; callbacks for checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bertlite.backend import TRAIN_STEP_OPTIONS, Backend, dropout_key
from bertlite.data.batches import ShuffledBatches
from bertlite.optim import OptimizerSettings
from bertlite.options import check_step_options


@dataclass
class History:
    """Per-step losses and learning rates, plus the running sums the book prints."""

    step: list[int] = field(default_factory=list)
    mlm_loss: list[float] = field(default_factory=list)
    nsp_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    pairs: int = 0          # sentence pairs trained on
    step_time: float = 0.0  # seconds inside the steps (data loading excluded)
    eval: list[dict[str, float]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # steps skipped for a non-finite loss

    def add(self, step: int, mlm: float, nsp: float, lr: float) -> None:
        self.step.append(step)
        self.mlm_loss.append(mlm)
        self.nsp_loss.append(nsp)
        self.lr.append(lr)

    @property
    def mean_mlm_loss(self) -> float:
        return sum(self.mlm_loss) / max(1, len(self.mlm_loss))

    @property
    def mean_nsp_loss(self) -> float:
        return sum(self.nsp_loss) / max(1, len(self.nsp_loss))

    @property
    def pairs_per_sec(self) -> float:
        return self.pairs / self.step_time if self.step_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "mlm_loss": self.mlm_loss, "nsp_loss": self.nsp_loss,
                "lr": self.lr, "pairs": self.pairs, "step_time": self.step_time,
                "eval": self.eval, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(**data)


@dataclass
class TrainState:
    """Where a run is: the next step, the data cursor (pass, batch) and the metrics."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    history: History = field(default_factory=History)
    #: settings changed on resume with ``override_resume`` (step, name, old and new value)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    #: why the loop ended before ``num_steps``: "signal", "max_time" or None
    stopped_by: str | None = None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


def summary_lines(history: History, devices_text: str) -> list[str]:
    """The book's two summary lines (and a third when steps were skipped)."""
    lines = [f"MLM loss {history.mean_mlm_loss:.3f}, NSP loss {history.mean_nsp_loss:.3f}",
             f"{history.pairs_per_sec:.1f} sentence pairs/sec on {devices_text}"]
    if history.skipped:
        shown = ", ".join(map(str, history.skipped[:10]))
        more = f", ... ({len(history.skipped) - 10} more)" if len(history.skipped) > 10 else ""
        lines.append(f"skipped {len(history.skipped)} step(s) with a non-finite loss: "
                     f"{shown}{more}")
    return lines


def step_seed(seed: int, step: int) -> int:
    """The framework seed for step ``step``: dropout depends on (seed, step) alone, so a resumed
    run draws the same dropout masks as an uninterrupted one, in any backend."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def train_bert(batches: ShuffledBatches, backend: Backend, model: Any, optimizer: Any,
               settings: OptimizerSettings, num_steps: int, *, seed: int = 0,
               state: TrainState | None = None,
               devices_text: str = "", progress: bool = True, max_time: float | None = None,
               callbacks: Sequence[Callable[[TrainState], None]] = (), accumulate: int = 1,
               precision: str = "float32", on_nan: str = "stop",
               stop: Callable[[], bool] | None = None) -> TrainState:
    """Train for ``num_steps`` optimizer steps in total (passes over the data repeat as needed),
    continuing from ``state`` when given. Callbacks run after every step (checkpoints,
    evaluation). ``max_time`` (seconds) stops early, after a whole step; so does ``stop``
    (e.g. a :class:`bertlite.signals.StopRequests`) once it returns True in any process: every
    process asks after every step, so all stop after the same one (``state.stopped_by``).

    Every step hands the backend the whole batch; ``accumulate`` and ``precision`` are passed
    on to :meth:`Backend.train_step`. A non-finite loss raises :class:`NonFiniteLossError`
    (``on_nan="stop"``) or, with ``on_nan="skip"``, the backend skips that update and the step
    number goes to ``history.skipped`` (the step still counts towards ``num_steps``). Only the
    backend's main process shows a progress bar."""
    from tqdm.auto import tqdm

    check_step_options(accumulate=accumulate, precision=precision, on_nan=on_nan)
    options = {key: value for key, value in (("accumulate", accumulate),
                                             ("precision", precision),
                                             ("skip_nonfinite", on_nan == "skip"))
               if value != TRAIN_STEP_OPTIONS[key]}
    state = state or TrainState()
    history = state.history
    if hasattr(batches, "read_share"):  # a prepared folder: each process reads its rows only
        rank, num_processes = backend.process_share()
        batches.read_share(rank, num_processes, accumulate=accumulate,
                           sum_over_processes=backend.sum_over_processes)
    stream = batches.stream(state.epoch, state.batch_index)
    bar = tqdm(total=num_steps, initial=state.step, desc="pretrain", unit="step",
               disable=not (progress and backend.is_main_process()), dynamic_ncols=True,
               leave=True)
    started = time.perf_counter()
    try:
        while state.step < num_steps:
            epoch, index, batch = next(stream)
            lr = settings.lr_at(state.step)
            backend.seed(step_seed(seed, state.step))
            tik = time.perf_counter()
            mlm, nsp = backend.train_step(model, optimizer, batch, lr, **options,
                                          **dropout_key(backend, seed, state.step))
            mlm, nsp = float(mlm), float(nsp)
            history.step_time += time.perf_counter() - tik
            state.epoch, state.batch_index = (epoch, index + 1) if index + 1 < len(batches) \
                else (epoch + 1, 0)
            finite = math.isfinite(mlm) and math.isfinite(nsp)
            if not finite and on_nan == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss at step {state.step + 1} (MLM {mlm}, NSP {nsp}); the "
                    "last checkpoint is kept: lower the learning rate, add warmup or clip_norm, "
                    "or pass on_nan='skip' to skip such steps")
            state.step += 1
            if finite:
                history.pairs += len(batch.tokens)
                history.add(state.step, mlm, nsp, lr)
            else:  # the backend skipped the update (skip_nonfinite)
                history.skipped.append(state.step)
            bar.update(1)
            bar.set_postfix(mlm=f"{mlm:.3f}", nsp=f"{nsp:.3f}",
                            pairs_s=f"{history.pairs_per_sec:.0f}", refresh=False)
            for callback in callbacks:
                callback(state)
            if stop is not None and backend.any_process(stop()):
                state.stopped_by = "signal"
                break
            if max_time is not None and backend.any_process(
                    time.perf_counter() - started >= max_time):
                state.stopped_by = "max_time"
                break
    finally:
        bar.close()
    return state
