"""The small interface every backend implements; the core drives training through it.

A backend owns only what must be framework code: devices, the network, the forward pass with
the core loss formula, backward and the optimizer update, and moving weights in and out as
numpy arrays under the canonical names of :mod:`bertlite.params`. Everything else (data,
schedule, metrics, plots, checkpoints' format) is the core's. The core never branches on a
backend's name.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.memory import SavedTensors
from bertlite.optim import OptimizerSettings

#: what ``precision=`` accepts: float32, or mixed precision with bfloat16 / float16 activations
#: (the weights, the optimizer state and the loss stay float32)
PRECISIONS = ("float32", "bf16", "fp16")
#: the keyword options of :meth:`Backend.train_step` and their defaults; the core passes only
#: those that differ from the default, so a backend without an option keeps working without it
TRAIN_STEP_OPTIONS = {"accumulate": 1, "precision": "float32", "skip_nonfinite": False}
#: the keywords of :meth:`Backend.train_step` that key its dropout masks (run seed, step); the
#: core passes them to a backend whose ``train_step`` takes them
DROPOUT_KEYS = ("seed", "step")
#: the keys of :meth:`Backend.info`, the same in every backend: the framework's name, version
#: and numpy's, the default devices (as strings), the number of GPUs, the CPU threads (with
#: where that number comes from), what the environment asks of several processes, and
#: framework build facts (a dict whose keys are the framework's own)
INFO_KEYS = ("framework", "version", "numpy", "devices", "gpus", "threads", "distributed",
             "build")


def dropout_key(backend: Backend, seed: int, step: int) -> dict[str, int]:
    """``{"seed": seed, "step": step}`` for a backend whose ``train_step`` takes them, else
    ``{}`` (a backend that draws its dropout with its own seeded RNG)."""
    params = inspect.signature(backend.train_step).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or all(
            key in params for key in DROPOUT_KEYS):
        return {"seed": int(seed) % (1 << 64), "step": int(step)}
    return {}


class Backend(ABC):
    """One framework. Subclasses are registered under the entry-point group
    ``bertlite.backends`` and instantiated without arguments."""

    #: the name users pass as ``backend=``
    name: str = ""
    #: the distribution to ``pip install`` for the framework
    framework: str = ""

    # -- devices and randomness ---------------------------------------------------------------
    @abstractmethod
    def parse_devices(self, spec: str | Sequence[Any] | None) -> list[Any]:
        """Framework devices from ``None`` (all GPUs, else the CPU), a string such as ``"cpu"``,
        ``"cuda:0,1"``, ``"cpu:0,cpu:1"``, or a list of device objects. Raises
        :class:`bertlite.errors.DeviceError` for devices that do not exist."""

    def describe_devices(self, devices: Sequence[Any]) -> str:
        """How the summary line names the devices (the book prints ``str(devices)``)."""
        return str(list(devices))

    @abstractmethod
    def seed(self, seed: int) -> None:
        """Seed the framework's own random numbers (dropout of a model called outside
        :meth:`train_step`, whose masks are keyed by its ``seed`` and ``step`` instead). The
        trainer calls it before every step with a seed derived from (run seed, step); it must
        be cheap."""

    # -- the model ----------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, config: BERTConfig, devices: Sequence[Any]) -> Any:
        """A ``BERTModel`` of ``config`` on ``devices``, parameters allocated (values are then
        set with :meth:`load_state_dict`), ready to train (hybridized, compiled, ...)."""

    @abstractmethod
    def state_dict(self, model: Any) -> dict[str, np.ndarray]:
        """All parameters as float32 numpy arrays under the canonical names."""

    @abstractmethod
    def load_state_dict(self, model: Any, arrays: dict[str, np.ndarray]) -> None:
        """Set all parameters from canonical numpy arrays (on every device of the model)."""

    # -- training -----------------------------------------------------------------------------
    @abstractmethod
    def create_optimizer(self, model: Any, settings: OptimizerSettings) -> Any:
        """The framework optimizer implementing ``settings`` (PyTorch's Adam/AdamW update)."""

    @abstractmethod
    def train_step(self, model: Any, optimizer: Any, batch: Batch, lr: float, *,
                   accumulate: int = 1, precision: str = "float32",
                   skip_nonfinite: bool = False, seed: int = 0, step: int = 0
                   ) -> tuple[Any, Any]:
        """Forward, the core loss (:func:`bertlite.loss.bert_loss`), backward and one update at
        learning rate ``lr``, with dropout on. Returns the batch's ``(mlm_loss, nsp_loss)`` as
        scalars that ``float()`` accepts (they may still be computing).

        ``batch`` is always the whole global batch of the step; how it is divided is the
        backend's business, and every division must give the update of the whole batch:

        - ``accumulate=K``: gradient accumulation. The batch is split into ``K`` micro-batches,
          run one after another; each micro-batch's loss uses the *whole batch's* normalizers
          (``mlm_weight_total=sum(batch.mlm_weights)``, ``num_examples=len(batch.tokens)`` of
          :func:`bertlite.loss.bert_loss`), so the micro-batch losses and gradients add up to
          those of the batch; one update follows. Only the activations of one micro-batch are
          held at a time.
        - ``precision``: one of :data:`PRECISIONS`. ``"bf16"`` / ``"fp16"`` run the forward pass
          in mixed precision (fp16 with loss scaling); weights, optimizer state and the loss
          stay float32 (logits are cast to float32 before the loss).
        - Data parallelism (several devices, several processes) shards the batch the same way:
          per-shard losses with the whole batch's normalizers, and the returned losses are the
          whole batch's (summed over shards and processes).
        - ``skip_nonfinite=True``: look at the loss before backward and, when it is NaN or
          infinite, skip backward and the update (model and optimizer state unchanged) and
          return the non-finite losses, so the core can record the skipped step. Under data
          parallelism every process must take the same decision.
        - ``seed``, ``step``: the run seed and the step number (from 0), the key of the dropout
          masks (:mod:`bertlite.dropout`): every piece of the batch takes the masks of its
          *global* rows (:mod:`bertlite.sharding` gives each piece's offset), so any split draws
          the masks of one process with the whole batch, and a resumed run those of an
          uninterrupted one. The core passes them whenever ``train_step`` takes them
          (:func:`dropout_key`).

        The core passes these keywords only when they differ from their defaults (see
        :data:`TRAIN_STEP_OPTIONS`); :meth:`check_train_options` says which a backend supports.
        """

    def check_train_options(self, devices: Sequence[Any], *, accumulate: int = 1,
                            precision: str = "float32", skip_nonfinite: bool = False) -> None:
        """Raise :class:`bertlite.errors.BackendError` before any work when this backend cannot
        train with these :meth:`train_step` options on ``devices``. The default checks the values
        (:func:`bertlite.options.check_step_options`, the one place) and accepts any option that
        this backend's ``train_step`` takes as a keyword; backends extend it (calling it first)
        for what depends on the device (fp16 needs a GPU, say)."""
        from bertlite.errors import BackendError
        from bertlite.options import check_step_options  # it imports this module

        check_step_options(accumulate=accumulate, precision=precision)
        requested = {"accumulate": accumulate, "precision": precision,
                     "skip_nonfinite": skip_nonfinite}
        params = inspect.signature(self.train_step).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key, value in requested.items():
            if value != TRAIN_STEP_OPTIONS[key] and not takes_any and key not in params:
                raise BackendError(f"the {self.name!r} backend does not support {key}={value!r} "
                                   f"yet; leave {key} at {TRAIN_STEP_OPTIONS[key]!r} or use "
                                   "another backend")

    @abstractmethod
    def optimizer_state(self, optimizer: Any) -> dict[str, np.ndarray]:
        """The optimizer's per-parameter state as numpy arrays, keyed
        ``"<canonical name>.exp_avg"`` / ``".exp_avg_sq"``, plus ``"step"`` (a 0-d array)."""

    @abstractmethod
    def load_optimizer_state(self, optimizer: Any, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""

    # -- inference and checks -----------------------------------------------------------------
    @abstractmethod
    def forward(self, model: Any, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(encoded_X, mlm_Y_hat, nsp_Y_hat)`` as numpy, dropout off, no gradients."""

    @abstractmethod
    def loss_and_grads(self, model: Any, batch: Batch
                       ) -> tuple[float, float, dict[str, np.ndarray]]:
        """``(mlm_loss, nsp_loss, gradients by canonical name)`` of one batch, dropout off, no
        update: for parity tests between backends and device layouts."""

    def encode(self, model: Any, token_ids: np.ndarray, segments: np.ndarray,
               valid_lens: np.ndarray) -> np.ndarray:
        """BERT encodings ``(batch, len, hidden)`` of token ids, dropout off."""
        n, length = token_ids.shape
        empty = np.zeros((n, 0), dtype=np.int32)
        batch = Batch(token_ids.astype(np.int32), segments.astype(np.int32),
                      valid_lens.astype(np.float32), empty, empty.astype(np.float32), empty,
                      np.zeros(n, dtype=np.int32))
        return self.forward(model, batch)[0]

    # -- several processes and memory --------------------------------------------------------
    def setup_processes(self, devices: Sequence[Any]) -> None:
        """Join the other processes when the environment asks for several (a process group, a
        distributed kvstore); nothing in one process. The trainer calls it once, right after
        :meth:`parse_devices` (which only parses: it joins nothing). Idempotent."""

    def is_main_process(self) -> bool:
        """False in every process but one when the backend trains over several processes (the
        core prints, plots and writes checkpoints only in the main one)."""
        return True

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any of the processes training together (the core asks
        before stopping early at ``max_time``, so that all of them stop after the same step)."""
        return flag

    def num_replicas(self, devices: Sequence[Any]) -> int:
        """How many model replicas share each global batch: devices times processes."""
        return max(1, len(devices))

    def saved_tensors(self) -> SavedTensors:
        """This backend's activation-memory terms, for the core's estimate
        (:func:`bertlite.memory.estimate_memory`); the default: the book's model as GPUs run
        it."""
        return SavedTensors()

    def free_memory(self, devices: Sequence[Any]) -> int | None:
        """Free bytes on the device with the least free memory, or None when unknown (the
        CPU): the core then skips its memory check."""
        return None

    def info(self) -> dict[str, Any]:
        """Versions and devices, for ``bertlite info``, under :data:`INFO_KEYS`."""
        return {}

    def __repr__(self) -> str:
        return f"<bertlite backend {self.name!r}>"
