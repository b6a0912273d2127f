"""Training in torch: the optimizer of :class:`bertlite.optim.OptimizerSettings`, one training
step with the core loss, gradients for parity checks, and the optimizer state as numpy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from bertlite.data.loader import Batch
from bertlite.loss import bert_loss
from bertlite.optim import OptimizerSettings
from bertlite.params import is_no_decay

from .loss import OPS
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
    """The BERTModel inside an ``nn.DataParallel`` (or the model itself)."""
    return model.module if isinstance(model, nn.DataParallel) else model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the first device under DataParallel)."""
    return unwrap(model).encoder.pos_embedding.device


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters under their canonical names (through a DataParallel wrapper)."""
    return unwrap(model).named_parameters()


# -- the optimizer -------------------------------------------------------------------------------

def _fused_supported(params: list[torch.Tensor]) -> bool:
    # Fused Adam(W) is one kernel for all parameters: 3x faster than foreach on this CPU, and
    # the fastest on CUDA; it needs floating-point parameters on one supported device type.
    types = {p.device.type for p in params}
    return len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point()
                                                                 for p in params)


def create_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` / ``AdamW`` implementing ``settings``: biases and LayerNorm
    parameters get no weight decay; each group carries its canonical ``param_names``; the clip
    norm is kept as ``optimizer.clip_norm`` (``None``: no clipping)."""
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
    optimizer = cls(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                    weight_decay=settings.weight_decay, **fast)
    optimizer.clip_norm = settings.clip_norm
    return optimizer


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _clip(optimizer: torch.optim.Optimizer) -> None:
    clip_norm = getattr(optimizer, "clip_norm", None)
    if clip_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)


# -- one step ------------------------------------------------------------------------------------

def batch_loss(model: nn.Module, batch: TorchBatch
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mlm_loss, nsp_loss, loss)`` of a batch with :func:`bertlite.loss.bert_loss`.

    On one device the MLM head runs only at prediction slots of non-zero weight (a third of the
    slots are padding in WikiText-2): the loss is the same, since padded slots have weight 0 in
    the formula, and the work of the vocabulary-sized output layer drops by that share. Under
    DataParallel (several GPUs) the wrapper is called on the whole batch instead.
    """
    if isinstance(model, nn.DataParallel) or batch.pred_positions.device.type != "cpu":
        _, mlm_Y_hat, nsp_Y_hat = model(batch.tokens, batch.segments, batch.valid_lens,
                                        batch.pred_positions)
        return bert_loss(OPS, mlm_Y_hat, batch.mlm_labels, batch.mlm_weights, nsp_Y_hat,
                         batch.nsp_labels)
    encoded_X, _, nsp_Y_hat = model(batch.tokens, batch.segments, batch.valid_lens)
    weights = batch.mlm_weights.reshape(-1)
    used = torch.nonzero(weights).reshape(-1)  # a data-dependent size: fine on the CPU
    rows = model.mlm.rows(encoded_X, batch.pred_positions).index_select(0, used)
    mlm_Y_hat = model.mlm.decode(encoded_X.reshape(-1, encoded_X.shape[-1]).index_select(0, rows))
    return bert_loss(OPS, mlm_Y_hat, batch.mlm_labels.reshape(-1).index_select(0, used),
                     weights.index_select(0, used), nsp_Y_hat, batch.nsp_labels)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, lr: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One update at learning rate ``lr`` with dropout on; returns the detached 0-d
    ``(mlm_loss, nsp_loss)`` without waiting for them (no host synchronization)."""
    if not model.training:
        model.train()
    tensors = to_tensors(batch, model_device(model))
    optimizer.zero_grad(set_to_none=True)
    mlm_l, nsp_l, l = batch_loss(model, tensors)
    l.backward()
    _clip(optimizer)
    _set_lr(optimizer, lr)
    optimizer.step()
    return mlm_l.detach(), nsp_l.detach()


def loss_and_grads(model: nn.Module, batch: Batch) -> tuple[float, float, dict[str, np.ndarray]]:
    """``(mlm_loss, nsp_loss, gradients by canonical name)`` with dropout off and no update;
    the model's gradients and mode are left as they were."""
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

def _named_optimizer_params(optimizer: torch.optim.Optimizer
                            ) -> Iterator[tuple[str, torch.Tensor, dict]]:
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None:
            raise ValueError("this optimizer was not made by create_optimizer: its parameter "
                             "groups have no canonical 'param_names'")
        for name, param in zip(names, group["params"]):
            yield name, param, group


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
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


def load_optimizer_state(optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray]
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
