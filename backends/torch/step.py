"""Training in torch: the optimizer of :class:`bertlite.optim.OptimizerSettings`, one training
step with the core loss (gradient accumulation, mixed precision, DDP shards, skipping
non-finite losses), gradients for parity checks, and the optimizer state as numpy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertlite import sharding
from bertlite.data.loader import Batch
from bertlite.dropout import SITE_KINDS
from bertlite.errors import BackendError
from bertlite.optim import OptimizerSettings
from bertlite.params import is_no_decay

from . import distributed
from .kernels import LayerMasks
from .loss import batch_loss
from .model import BERTModel


class TorchBatch(NamedTuple):
    """A :class:`bertlite.data.loader.Batch` as torch tensors on one device."""

    tokens: torch.Tensor
    segments: torch.Tensor
    valid_lens: torch.Tensor
    pred_positions: torch.Tensor
    mlm_weights: torch.Tensor
    mlm_labels: torch.Tensor
    nsp_labels: torch.Tensor


#: fields the loss needs as int64 (torch's cross-entropy wants Long labels); token, segment and
#: position ids stay int32 (embedding and index_select take them as they are).
_INT64_FIELDS = frozenset({"mlm_labels", "nsp_labels"})


def to_tensors(batch: Batch, device: torch.device) -> TorchBatch:
    """The batch as tensors on ``device``: zero-copy ``from_numpy`` on the CPU; pinned memory
    and asynchronous copies to a GPU."""
    cuda = torch.device(device).type == "cuda"
    tensors = []
    for name, array in zip(Batch._fields, batch):
        array = np.asarray(array)
        if name in _INT64_FIELDS and array.dtype != np.int64:
            array = array.astype(np.int64)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if cuda:
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        tensors.append(tensor)
    return TorchBatch(*tensors)


def unwrap(model: nn.Module) -> BERTModel:
    """The BERTModel inside an ``nn.DataParallel`` or ``DistributedDataParallel`` (or the model
    itself)."""
    return model.module if isinstance(model, (nn.DataParallel, DistributedDataParallel)) \
        else model


def local_model(model: nn.Module) -> nn.Module:
    """The model without a DDP wrapper, for work one process does alone (inference, parity
    gradients): calling the DDP wrapper would wait for the other processes."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the first device under DataParallel)."""
    return unwrap(model).encoder.pos_embedding.device


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters under their canonical names (through a DataParallel wrapper)."""
    return unwrap(model).named_parameters()


# -- the optimizer -------------------------------------------------------------------------------

def _fused_supported(params: list[torch.Tensor]) -> bool:
    # Fused Adam(W) is one kernel for all parameters, faster than foreach on the CPU and CUDA
    # (benchmarks/README.md); it needs floating-point parameters on one supported device type.
    types = {p.device.type for p in params}
    return len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point()
                                                                 for p in params)


class TorchOptimizer:
    """What ``TorchBackend.create_optimizer`` returns (the mirror of MXNet's
    ``MXNetOptimizer``): ``torch.optim.Adam`` / ``AdamW`` implementing ``settings`` as
    :attr:`optimizer` -- biases and LayerNorm parameters without weight decay, each group with
    its canonical ``param_names`` -- and the step's own state beside it: the clip norm
    (``None``: no clipping), the fp16 ``GradScaler`` (made on first use) and how many steps a
    non-finite loss skipped. Checkpoints hold only the torch optimizer's state."""

    def __init__(self, model: nn.Module, settings: OptimizerSettings) -> None:
        decay, no_decay = [], []
        for name, param in named_parameters(model):
            (no_decay if is_no_decay(name) else decay).append((name, param))
        groups = []
        for members, weight_decay in ((decay, settings.weight_decay), (no_decay, 0.0)):
            if members:
                groups.append({"params": [p for _, p in members],
                               "param_names": [n for n, _ in members],
                               "weight_decay": weight_decay})
        params = [p for _, p in named_parameters(model)]
        fast = {"fused": True} if _fused_supported(params) else {"foreach": True}
        cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
        self.settings = settings
        self.optimizer: torch.optim.Optimizer = cls(
            groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
            weight_decay=settings.weight_decay, **fast)
        self.clip_norm: float | None = settings.clip_norm
        self.grad_scaler: torch.amp.GradScaler | None = None
        #: steps whose non-finite loss skipped the update (``skip_nonfinite``)
        self.nonfinite_skips = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"<TorchOptimizer {self.settings.optimizer} clip_norm={self.clip_norm}>"


def create_optimizer(model: nn.Module, settings: OptimizerSettings) -> TorchOptimizer:
    return TorchOptimizer(model, settings)


def _set_lr(optimizer: TorchOptimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _clip(optimizer: TorchOptimizer) -> None:
    if optimizer.clip_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, optimizer.clip_norm, foreach=True)


# -- mixed precision -----------------------------------------------------------------------------

def check_precision(precision: str, devices: Sequence[torch.device]) -> None:
    """Raise :class:`bertlite.errors.BackendError` when ``devices`` cannot train in
    ``precision`` (one of :data:`bertlite.backend.PRECISIONS`, checked by
    :mod:`bertlite.options`)."""
    for device in map(torch.device, devices):
        if precision == "fp16" and device.type != "cuda":
            raise BackendError(f"precision='fp16' needs a CUDA GPU (float16 with loss scaling "
                               f"by torch.amp.GradScaler); this run is on {device}: use "
                               "precision='bf16' on the CPU, or float32")
        if precision == "bf16" and device.type == "cuda" \
                and not torch.cuda.is_bf16_supported():
            raise BackendError(f"precision='bf16' is not supported by {device} "
                               f"({torch.cuda.get_device_name(device)}); use precision='fp16'")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context for ``precision`` (none for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(optimizer: TorchOptimizer, precision: str) -> torch.amp.GradScaler | None:
    """The optimizer's ``torch.amp.GradScaler`` for fp16 (made on first use), else None."""
    if precision != "fp16":
        return None
    if optimizer.grad_scaler is None:
        optimizer.grad_scaler = torch.amp.GradScaler("cuda")
    return optimizer.grad_scaler


# -- one step ------------------------------------------------------------------------------------

def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(*(np.asarray(a)[rows] for a in batch))


def dropout_masks(model: BERTModel, seed: int, step: int, rows: slice, length: int,
                  device: torch.device) -> list[LayerMasks]:
    """The dropout masks at ``(seed, step)`` of the global rows ``rows`` of a batch padded to
    ``length``, per layer (:class:`.kernels.LayerMasks`: drawn where the model reads them, so
    the packed path draws only the valid tokens' elements): those of one process with the
    whole batch, whatever the split. Empty when the model has no dropout."""
    config = model.config
    if config.dropout == 0:
        return []
    return [LayerMasks(config, seed, step, layer, rows.start, rows.stop - rows.start, length,
                       device) for layer in range(config.num_layers)]


def _full(masks: list[LayerMasks]) -> list[dict[str, torch.Tensor]]:
    """Whole masks by site (what ``nn.DataParallel`` can scatter over its devices)."""
    return [{kind: layer.get(kind) for kind in SITE_KINDS} for layer in masks]


def micro_batches(batch: Batch, accumulate: int, rank: int = 0, world_size: int = 1
                  ) -> list[tuple[Batch, float]]:
    """This process's micro-batches of a global batch, each with the factor its loss gets.

    Without DDP, empty parts (a batch of fewer rows than ``accumulate``) are left out. Under
    DDP every process must run the same number of forward and backward passes, so an empty
    part becomes the batch's first row with factor 0: no loss, no gradient, same collectives.
    """
    return [(_rows(batch, rows), factor) for rows, factor in _parts(batch, accumulate, rank,
                                                                    world_size)]


def _parts(batch: Batch, accumulate: int, rank: int, world_size: int
           ) -> list[tuple[slice, float]]:
    """The global rows of :func:`micro_batches`' parts and their factors."""
    parts = sharding.process_parts(len(batch.tokens), accumulate, rank, world_size)
    if world_size == 1:
        return [(rows, 1.0) for rows in parts if rows.stop > rows.start]
    return [(rows, 1.0) if rows.stop > rows.start else (slice(0, 1), 0.0) for rows in parts]


def _skip_update(optimizer: TorchOptimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    optimizer.nonfinite_skips += 1


def train_step(model: nn.Module, optimizer: TorchOptimizer, batch: Batch, lr: float, *,
               accumulate: int = 1, precision: str = "float32", skip_nonfinite: bool = False,
               seed: int = 0, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One update at learning rate ``lr`` with dropout on, from the global ``batch``; returns
    the batch's detached 0-d ``(mlm_loss, nsp_loss)``.

    The batch is cut into this process's share (under DDP) and ``accumulate`` micro-batches
    (:func:`micro_batches`); each micro-batch's loss uses the global batch's normalizers, and
    under DDP is multiplied by the world size against DDP's averaging, so the gradients add up
    to those of the global batch in one process. DDP all-reduces gradients once, at the last
    micro-batch. The returned losses are summed over micro-batches and processes. Every
    micro-batch takes the dropout masks of its global rows at ``(seed, step)``
    (:func:`dropout_masks`), so the split does not change them.

    ``precision`` runs the forward pass under autocast (fp16 with the optimizer's GradScaler).
    With ``skip_nonfinite`` every micro-batch's loss is checked (summed over processes, so all
    decide alike) before its backward; a non-finite one drops the accumulated gradients and the
    update, counts ``optimizer.nonfinite_skips`` and returns non-finite losses. Without it there
    is no host synchronization on one device.
    """
    if not model.training:
        model.train()
    device = model_device(model)
    check_precision(precision, [device])  # the device's part; the value: bertlite.options
    ddp = isinstance(model, DistributedDataParallel)
    info = distributed.world() if ddp else None
    rank, world_size = (info.rank, info.world_size) if info else (0, 1)
    # the global batch's normalizers (0/1 weights: the float32 sum is exact)
    mlm_weight_total, num_examples = sharding.normalizers(batch.mlm_weights)
    chunks = _parts(batch, accumulate, rank, world_size)
    scaler = grad_scaler(optimizer, precision)
    optimizer.zero_grad(set_to_none=True)

    def masks(rows: slice) -> list[LayerMasks] | list[dict[str, torch.Tensor]]:
        layers = dropout_masks(unwrap(model), seed, step, rows, batch.tokens.shape[1], device)
        return _full(layers) if isinstance(model, nn.DataParallel) else layers

    total = torch.zeros(2, dtype=torch.float32, device=device)
    for i, (rows, factor) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
        with sync:
            with autocast(precision, device):
                mlm_l, nsp_l, l = batch_loss(
                    model, to_tensors(_rows(batch, rows), device),
                    mlm_weight_total=mlm_weight_total, num_examples=num_examples,
                    masks=masks(rows))
            values = torch.stack((mlm_l.detach(), nsp_l.detach())) * factor
            if skip_nonfinite:
                if ddp:
                    distributed.all_reduce_sum(values)
                if not bool(torch.isfinite(values).all()):
                    _skip_update(optimizer)
                    return values[0], values[1]
            total += values
            l = l * (factor * world_size) if (ddp or factor != 1.0) else l
            (scaler.scale(l) if scaler is not None else l).backward()
    if ddp and not skip_nonfinite:
        distributed.all_reduce_sum(total)
    if scaler is not None:
        if optimizer.clip_norm is not None:
            scaler.unscale_(optimizer.optimizer)
        _clip(optimizer)
        _set_lr(optimizer, lr)
        scaler.step(optimizer.optimizer)
        scaler.update()
    else:
        _clip(optimizer)
        _set_lr(optimizer, lr)
        optimizer.optimizer.step()
    return total[0], total[1]


def loss_and_grads(model: nn.Module, batch: Batch) -> tuple[float, float, dict[str, np.ndarray]]:
    """``(mlm_loss, nsp_loss, gradients by canonical name)`` with dropout off and no update;
    the model's gradients and mode are left as they were."""
    model = local_model(model)
    was_training = model.training
    params = dict(named_parameters(model))
    saved = {name: p.grad for name, p in params.items()}
    model.eval()
    try:
        for p in params.values():
            p.grad = None
        mlm_l, nsp_l, l = batch_loss(model, to_tensors(batch, model_device(model)))
        l.backward()
        grads = {name: (np.zeros(tuple(p.shape), np.float32) if p.grad is None
                        else p.grad.detach().cpu().numpy().astype(np.float32, copy=True))
                 for name, p in params.items()}
        return mlm_l.item(), nsp_l.item(), grads
    finally:
        for name, p in params.items():
            p.grad = saved[name]
        model.train(was_training)


# -- optimizer state -----------------------------------------------------------------------------

def _named_optimizer_params(optimizer: TorchOptimizer
                            ) -> Iterator[tuple[str, torch.Tensor, dict]]:
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None:
            raise ValueError("this optimizer was not made by create_optimizer: its parameter "
                             "groups have no canonical 'param_names'")
        for name, param in zip(names, group["params"]):
            yield name, param, group


def optimizer_state(optimizer: TorchOptimizer) -> dict[str, np.ndarray]:
    """``"<name>.exp_avg"``, ``"<name>.exp_avg_sq"`` per parameter and the 0-d ``"step"``
    (zeros and step 0 before the first update)."""
    arrays: dict[str, np.ndarray] = {}
    step = 0
    for name, param, _ in _named_optimizer_params(optimizer):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            arrays[f"{name}.{key}"] = (
                np.zeros(tuple(param.shape), np.float32) if value is None
                else value.detach().cpu().numpy().astype(np.float32, copy=True))
        if "step" in state:
            step = int(float(state["step"]))
    arrays["step"] = np.array(step, dtype=np.int64)
    return arrays


def load_optimizer_state(optimizer: TorchOptimizer, arrays: dict[str, np.ndarray]
                         ) -> None:
    """Restore what :func:`optimizer_state` returned (step 0 clears the state)."""
    named = list(_named_optimizer_params(optimizer))
    expected = {f"{n}.{k}" for n, _, _ in named for k in ("exp_avg", "exp_avg_sq")} | {"step"}
    missing = sorted(expected - set(arrays))
    unexpected = sorted(set(arrays) - expected)
    if missing or unexpected:
        raise ValueError(f"optimizer state does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    step = int(np.asarray(arrays["step"]))
    for name, param, group in named:
        if step == 0:
            optimizer.state.pop(param, None)
            continue
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            value = np.asarray(arrays[f"{name}.{key}"], dtype=np.float32)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"optimizer state {name}.{key} has shape {value.shape}, "
                                 f"the parameter {tuple(param.shape)}")
            state[key] = torch.from_numpy(value.copy()).to(param.device)
        # Where torch keeps "step": on the parameter's device for fused/capturable updates.
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                     device=param.device if on_device else "cpu")
