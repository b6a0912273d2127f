"""The PyTorch backend: what the core drives training through (see :mod:`bertlite.backend`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bertlite.backend import Backend
from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.errors import DeviceError
from bertlite.optim import OptimizerSettings
from bertlite.params import check_state_dict, parameter_shapes

from . import step as _step
from .devices import parse_devices
from .model import BERTModel


class TorchBackend(Backend):
    """PyTorch: one device, or several CUDA GPUs through ``nn.DataParallel``."""

    name = "torch"
    framework = "torch"

    # -- devices and randomness ---------------------------------------------------------------
    def parse_devices(self, spec: str | Sequence[Any] | None) -> list[torch.device]:
        return parse_devices(spec)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # the CPU generator and every CUDA one

    # -- the model ----------------------------------------------------------------------------
    def build_model(self, config: BERTConfig, devices: Sequence[Any]) -> nn.Module:
        """A BERTModel on ``devices[0]``, in ``nn.DataParallel`` over several GPUs."""
        devices = parse_devices(list(devices)) if devices else [torch.device("cpu")]
        model = BERTModel.from_config(config, seed=0).to(devices[0])
        if len(devices) > 1:
            if any(d.type != "cuda" for d in devices):
                raise DeviceError(f"several devices need CUDA GPUs, got {devices}")
            model = nn.DataParallel(model, device_ids=devices, output_device=devices[0])
        return model.train()

    def state_dict(self, model: nn.Module) -> dict[str, np.ndarray]:
        params = dict(_step.named_parameters(model))
        return {name: params[name].detach().cpu().numpy().astype(np.float32, copy=True)
                for name in parameter_shapes(_step.unwrap(model).config)}

    def load_state_dict(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
        check_state_dict(arrays, _step.unwrap(model).config, "the state dict")
        with torch.no_grad():
            for name, param in _step.named_parameters(model):
                value = np.ascontiguousarray(arrays[name], dtype=np.float32)
                param.copy_(torch.from_numpy(value))

    # -- training -----------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module, settings: OptimizerSettings
                         ) -> torch.optim.Optimizer:
        return _step.create_optimizer(model, settings)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                   lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _step.train_step(model, optimizer, batch, lr)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
        return _step.optimizer_state(optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             arrays: dict[str, np.ndarray]) -> None:
        _step.load_optimizer_state(optimizer, arrays)

    # -- inference and checks -----------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eval mode under ``torch.inference_mode()``; the model's mode is restored."""
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                t = _step.to_tensors(batch, _step.model_device(model))
                num_preds = t.pred_positions.shape[1]
                encoded, mlm, nsp = model(t.tokens, t.segments, t.valid_lens,
                                          t.pred_positions if num_preds else None)
                if mlm is None:
                    vocab_size = _step.unwrap(model).config.vocab_size
                    mlm_np = np.zeros((t.tokens.shape[0], 0, vocab_size), np.float32)
                else:
                    mlm_np = mlm.cpu().numpy()
                return encoded.cpu().numpy(), mlm_np, nsp.cpu().numpy()
        finally:
            model.train(was_training)

    def loss_and_grads(self, model: nn.Module, batch: Batch
                       ) -> tuple[float, float, dict[str, np.ndarray]]:
        return _step.loss_and_grads(model, batch)

    def info(self) -> dict[str, Any]:
        cuda = torch.cuda.is_available()
        return {
            "torch": torch.__version__,
            "cuda_build": torch.version.cuda,
            "cuda_available": cuda,
            "devices": [str(d) for d in parse_devices(None)],
            "device_names": ([torch.cuda.get_device_name(i)
                              for i in range(torch.cuda.device_count())] if cuda else ["cpu"]),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
