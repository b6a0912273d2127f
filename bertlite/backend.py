"""The small interface every backend implements; the core drives training through it.

A backend owns only what must be framework code: devices, the network, the forward pass with
the core loss formula, backward and the optimizer update, and moving weights in and out as
numpy arrays under the canonical names of :mod:`bertlite.params`. Everything else (data,
schedule, metrics, plots, checkpoints' format) is the core's. The core never branches on a
backend's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.optim import OptimizerSettings


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
        """Seed the framework's own random numbers (dropout). The trainer calls it before every
        step with a seed derived from (run seed, step), which is what makes resume exact; it
        must be cheap."""

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
    def train_step(self, model: Any, optimizer: Any, batch: Batch, lr: float) -> tuple[Any, Any]:
        """Forward, the core loss (:func:`bertlite.loss.bert_loss`), backward and one update at
        learning rate ``lr``, with dropout on. Returns the batch's ``(mlm_loss, nsp_loss)`` as
        scalars that ``float()`` accepts (they may still be computing)."""

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

    def info(self) -> dict[str, Any]:
        """Versions and devices, for ``bertlite info``."""
        return {}

    def __repr__(self) -> str:
        return f"<bertlite backend {self.name!r}>"
