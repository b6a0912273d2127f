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
from bertlite.memory import SavedTensors
from bertlite.optim import OptimizerSettings
from bertlite.params import check_state_dict, parameter_shapes

from . import distributed
from . import step as _step
from .devices import parse_devices
from .model import BERTModel

#: the tensors this backend's training step saves for backward (:mod:`bertlite.memory`): the book's
#: model with dropout on, as GPUs run it. Calibration (``tests/test_scale.py``): on the CPU the
#: estimate's total was within 5% of the measured growth of peak RSS over two training steps
#: (float32, dropout on) for ten small configurations (hidden 32-256, 1-8 layers, length 32-256,
#: vocabulary 1,000-50,000), and for one in bf16, when it was set; the step has changed since (the
#: 20,000-word case now measures 1.22x the estimate on the plain path), so the test checks 0.7-1.3x;
#: when the step changes, rerun those tests. The float32 CPU fast path (no padding, a sparse last
#: layer, the MLM decoder fused with its loss) needs 10-40% less. Not counted: the allocator's
#: overhead (glibc keeps freed blocks resident, another 10-40% of peak RSS here; CUDA's caching
#: allocator and context), the data pipeline and the framework. High without dropout, whose fused
#: attention keeps no (length x length) matrices, and every prediction slot counts as used (real
#: batches pad about a third of them).
SAVED_TENSORS = SavedTensors(block_hidden=8, block_ffn=1, block_hidden_float32=2,
                             block_float32=4, block_scores=3, embedding_hidden_float32=1,
                             head_hidden=3, head_vocab_float32=1,
                             backward_head_vocab_float32=1, backward_scores=2, backward_ffn=1,
                             # masks drawn where read, in the forward pass (kernels.LayerMasks):
                             # none held on the host (the saved scaled ones are in block_*)
                             host_mask_bytes=0)


class TorchBackend(Backend):
    """PyTorch: one device, several CUDA GPUs through ``nn.DataParallel`` in one process, or
    one device per process with ``DistributedDataParallel`` when launched by ``torchrun``
    (see :mod:`.distributed`).

    ``fast`` (default True) is the models' switch between the fast path of :mod:`.fast` and
    the plain model of :mod:`.model` (``BERTModel.fast``): the same losses and gradients."""

    name = "torch"
    framework = "torch"

    def __init__(self, fast: bool = True) -> None:
        self.fast = fast

    # -- devices and randomness ---------------------------------------------------------------
    def parse_devices(self, spec: str | Sequence[Any] | None) -> list[torch.device]:
        """Under torchrun (``WORLD_SIZE`` > 1) this process's one device, ``cuda:LOCAL_RANK``
        by default; the process group is joined by :meth:`setup_processes`."""
        return distributed.local_device(spec is not None, parse_devices(spec))

    def describe_devices(self, devices: Sequence[Any]) -> str:
        text = str(list(devices))
        world_size = distributed.world_size()
        return f"{text} x {world_size} processes" if world_size > 1 else text

    def seed(self, seed: int) -> None:
        # the CPU generator and every CUDA one; under DDP each process draws its own dropout
        rank = distributed.rank()
        torch.manual_seed(seed if rank == 0 else (seed * 1_000_003 + rank) % (2**63 - 1))

    # -- the model ----------------------------------------------------------------------------
    def build_model(self, config: BERTConfig, devices: Sequence[Any]) -> nn.Module:
        """A BERTModel on ``devices[0]``, in ``nn.DataParallel`` over several GPUs, or in
        ``DistributedDataParallel`` under torchrun."""
        devices = parse_devices(list(devices)) if devices else [torch.device("cpu")]
        model = BERTModel.from_config(config, seed=0, fast=self.fast).to(devices[0])
        if distributed.is_distributed():
            if len(devices) > 1:
                raise DeviceError(f"under torchrun every process trains on one device, got "
                                  f"{devices}")
            self.setup_processes(devices)  # DDP needs the process group (idempotent)
            return distributed.wrap(model, devices[0]).train()
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
                         ) -> _step.TorchOptimizer:
        return _step.create_optimizer(model, settings)

    def train_step(self, model: nn.Module, optimizer: _step.TorchOptimizer, batch: Batch,
                   lr: float, *, accumulate: int = 1, precision: str = "float32",
                   skip_nonfinite: bool = False, seed: int = 0, step: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return _step.train_step(model, optimizer, batch, lr, accumulate=accumulate,
                                precision=precision, skip_nonfinite=skip_nonfinite, seed=seed,
                                step=step)

    def check_train_options(self, devices: Sequence[Any], *, accumulate: int = 1,
                            precision: str = "float32", skip_nonfinite: bool = False) -> None:
        super().check_train_options(devices, accumulate=accumulate, precision=precision,
                                    skip_nonfinite=skip_nonfinite)
        _step.check_precision(precision, list(devices) or [torch.device("cpu")])

    def optimizer_state(self, optimizer: _step.TorchOptimizer) -> dict[str, np.ndarray]:
        return _step.optimizer_state(optimizer)

    def load_optimizer_state(self, optimizer: _step.TorchOptimizer,
                             arrays: dict[str, np.ndarray]) -> None:
        _step.load_optimizer_state(optimizer, arrays)

    # -- several processes and memory --------------------------------------------------------
    def setup_processes(self, devices: Sequence[Any]) -> None:
        """Under torchrun, join the process group on this process's device (NCCL for CUDA,
        Gloo for the CPU; :func:`.distributed.setup`)."""
        if distributed.is_distributed():
            distributed.setup(torch.device(devices[0]) if devices else torch.device("cpu"))

    def is_main_process(self) -> bool:
        return distributed.rank() == 0

    def any_process(self, flag: bool) -> bool:
        return distributed.any_process(flag)

    def process_share(self) -> tuple[int, int]:
        info = distributed.world() if distributed.is_initialized() else None
        return (info.rank, info.world_size) if info else (0, 1)

    def sum_over_processes(self, value: float) -> float:
        return distributed.sum_over_processes(value)

    def num_replicas(self, devices: Sequence[Any]) -> int:
        return max(1, len(devices)) * distributed.world_size()

    def saved_tensors(self) -> SavedTensors:
        return SAVED_TENSORS

    def free_memory(self, devices: Sequence[Any]) -> int | None:
        """The least free memory of the CUDA devices (``torch.cuda.mem_get_info``); None on
        the CPU, where the operating system decides."""
        devices = [torch.device(d) for d in devices]
        if not devices or any(d.type != "cuda" for d in devices):
            return None
        return min(int(torch.cuda.mem_get_info(d)[0]) for d in devices)

    # -- inference and checks -----------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eval mode under ``torch.inference_mode()``; the model's mode is restored."""
        model = _step.local_model(model)  # one process alone, not through DDP
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
            "framework": "torch",
            "version": torch.__version__,
            "numpy": np.__version__,
            "devices": [str(d) for d in parse_devices(None)],
            "gpus": torch.cuda.device_count() if cuda else 0,
            "threads": _threads(),
            "distributed": _describe_distributed(),
            "build": {
                "cuda": torch.version.cuda,
                "cuda_available": cuda,
                "device_names": ([torch.cuda.get_device_name(i)
                                  for i in range(torch.cuda.device_count())] if cuda
                                 else ["cpu"]),
                "num_interop_threads": torch.get_num_interop_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            },
        }


def _threads() -> str:
    """How many threads torch's CPU operators use, and what set that number."""
    where = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in
             os.environ else "torch's default")
    return f"{torch.get_num_threads()} ({where})"


def _describe_distributed() -> str:
    """What the environment asks for, without joining anything."""
    try:
        info = distributed.env_world()
    except Exception as err:  # a broken environment is reported, not fatal
        return f"misconfigured ({err})"
    if info is None:
        return "no (one process)"
    return (f"rank {info.rank} of {info.world_size}, rendezvous "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
