"""One training step over one or more devices, and PyTorch's Adam/AdamW as an MXNet optimizer.

A batch is split over the devices with ``gluon.utils.split_and_load(..., even_split=False)``;
every shard's loss is its share of the batch loss (:mod:`.loss`), so the gradients that
``trainer`` sums over the devices (through a kvstore when there are several) are the one-device
gradient and the step is ``trainer.step(1)``.

:class:`TorchAdam` is ``torch.optim.Adam`` / ``AdamW`` exactly (bias correction inside the
denominator, decoupled decay for AdamW), written with MXNet's fused ``adam_update``: torch's

    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

is ``adam_update`` at ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` and ``eps * sqrt(1 - b2^t)``
(MXNet's own Adam corrects the learning rate only, so its epsilon acts ``1/sqrt(1 - b2^t)``
times larger than torch's). ``t`` counts each parameter's updates, as torch's state does.

``clip_norm`` is ``torch.nn.utils.clip_grad_norm_`` on the summed gradient (its epsilon 1e-6;
``gluon.utils.clip_global_norm`` adds 1e-8 and, by default, waits for the norm on the host).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon
from mxnet import np as mnp

from bertlite.data.loader import Batch
from bertlite.optim import OptimizerSettings
from bertlite.params import is_no_decay

from .loss import _get_batch_loss_bert

__all__ = ["MXNetOptimizer", "TorchAdam", "clip_grad_norm", "create_optimizer",
           "load_optimizer_state", "loss_and_grads", "optimizer_state", "split_batch",
           "train_step"]

#: torch.nn.utils.clip_grad_norm_'s epsilon
CLIP_EPSILON = 1e-6


@mx.optimizer.Optimizer.register
class TorchAdam(mx.optimizer.Optimizer):
    """PyTorch's Adam (``decoupled=False``: L2 decay added to the gradient) or AdamW
    (``decoupled=True``: ``w -= lr * wd * w`` before the Adam step). Registered with MXNet as
    ``"torchadam"``. Per-parameter ``wd_mult`` (0 for biases and LayerNorm) scales ``wd``."""

    def __init__(self, learning_rate: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, decoupled: bool = False, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.decoupled = decoupled

    def create_state(self, index, weight):
        return (mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype),  # exp_avg
                mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype))  # exp_avg_sq

    def update(self, index, weight, grad, state):
        self._update_count(index)
        t = self._index_update_count[index]
        lr, wd = self._get_lr(index), self._get_wd(index)
        bias_correction1 = 1.0 - self.beta1 ** t
        sqrt_bias_correction2 = math.sqrt(1.0 - self.beta2 ** t)
        if self.decoupled and wd:
            weight *= 1.0 - lr * wd
        exp_avg, exp_avg_sq = state
        mx.nd.adam_update(weight, grad, exp_avg, exp_avg_sq, out=weight,
                          lr=lr * sqrt_bias_correction2 / bias_correction1,
                          epsilon=self.epsilon * sqrt_bias_correction2,
                          wd=0.0 if self.decoupled else wd, beta1=self.beta1, beta2=self.beta2,
                          rescale_grad=self.rescale_grad,
                          clip_gradient=self.clip_gradient or -1.0)


class MXNetOptimizer:
    """What ``MXNetBackend.create_optimizer`` returns: a ``gluon.Trainer`` running
    :class:`TorchAdam`, the settings, and the canonical name of every trainer index."""

    def __init__(self, net, settings: OptimizerSettings) -> None:
        devices = list(net.devices) or next(iter(net.collect_params().values())).list_ctx()
        params = net.canonical_parameters()
        for name, param in params.items():
            param.wd_mult = 0.0 if is_no_decay(name) else 1.0
        self.settings, self.devices = settings, devices
        self.optimizer = TorchAdam(learning_rate=settings.lr, beta1=settings.betas[0],
                                   beta2=settings.betas[1], epsilon=settings.eps,
                                   wd=settings.weight_decay,
                                   decoupled=settings.optimizer == "adamw")
        # several devices: the 'device' kvstore sums the gradients (kvstore=None would let the
        # replicas diverge; with one device Gluon uses none); update_on_kvstore=False keeps the
        # optimizer state in the trainer's updaters, where it can be exported
        self.trainer = gluon.Trainer(net.collect_params(), self.optimizer, kvstore="device",
                                     update_on_kvstore=False)
        by_param = {param.name: name for name, param in params.items()}
        self.index_to_name = {i: by_param[p.name] for i, p in enumerate(self.trainer._params)}
        self.name_to_index = {n: i for i, n in self.index_to_name.items()}

    def __repr__(self) -> str:
        return f"<MXNetOptimizer {self.settings.optimizer} on {self.devices}>"


def create_optimizer(net, settings: OptimizerSettings) -> MXNetOptimizer:
    return MXNetOptimizer(net, settings)


def split_batch(batch: Batch | Sequence[Any], devices: Sequence[mx.Context]) -> list[list[Any]]:
    """Each of the batch's seven arrays as shards over ``devices`` (uneven shards allowed)."""
    return [gluon.utils.split_and_load(a, devices, even_split=False) for a in batch]


def clip_grad_norm(params: Sequence[gluon.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ on every device's (already summed) gradients: scale by
    ``min(1, max_norm / (norm + 1e-6))`` where ``norm`` is the global 2-norm. Asynchronous."""
    per_device = zip(*(p.list_grad() for p in params if p.grad_req != "null"))
    for grads in per_device:
        total = mnp.sqrt(sum((g * g).sum() for g in grads))
        coef = mnp.minimum(max_norm / (total + CLIP_EPSILON), 1.0)
        for g in grads:
            g *= coef


def _sum_on(arrays: Sequence[Any], ctx: mx.Context) -> Any:
    total = None
    for a in arrays:
        a = a.as_in_ctx(ctx)
        total = a if total is None else total + a
    return total


def train_step(net, opt: MXNetOptimizer, batch: Batch, lr: float) -> tuple[Any, Any]:
    """Forward with dropout, the core loss per shard, backward, one update at ``lr``.
    Returns the batch's ``(mlm_loss, nsp_loss)`` as 0-d arrays on the first device, still
    computing (no synchronization here)."""
    devices = opt.devices
    shards = split_batch(batch, devices)
    with autograd.record():
        mlm_ls, nsp_ls, ls = _get_batch_loss_bert(net, None, net.config.vocab_size, *shards)
    for l in ls:
        l.backward()
    opt.trainer.set_learning_rate(lr)
    if opt.settings.clip_norm is None:
        opt.trainer.step(1)
    else:
        opt.trainer.allreduce_grads()
        clip_grad_norm(list(net.collect_params().values()), opt.settings.clip_norm)
        opt.trainer.update(1)
    return _sum_on(mlm_ls, devices[0]), _sum_on(nsp_ls, devices[0])


def loss_and_grads(net, batch: Batch, devices: Sequence[mx.Context] | None = None
                   ) -> tuple[float, float, dict[str, onp.ndarray]]:
    """The batch's MLM and NSP losses and the gradients (summed over the devices' shards, by
    canonical name), dropout off, no update."""
    devices = list(devices or net.devices)
    shards = split_batch(batch, devices)
    with autograd.record(train_mode=False):
        mlm_ls, nsp_ls, ls = _get_batch_loss_bert(net, None, net.config.vocab_size, *shards)
    for l in ls:
        l.backward()
    grads = {}
    for name, param in net.canonical_parameters().items():
        total = None
        for g in param.list_grad():
            g = g.asnumpy()
            total = g if total is None else total + g
        grads[name] = total.astype(onp.float32)
    return (float(_sum_on(mlm_ls, devices[0])), float(_sum_on(nsp_ls, devices[0])), grads)


def _step_count(opt: MXNetOptimizer) -> int:
    counts = opt.optimizer._all_index_update_counts
    return max((max(c.values()) for c in counts.values() if c), default=0)


def optimizer_state(opt: MXNetOptimizer) -> dict[str, onp.ndarray]:
    """``"<canonical>.exp_avg"``, ``"<canonical>.exp_avg_sq"`` (zeros before the first step)
    and ``"step"`` as numpy arrays, from the first device's updater."""
    states = opt.trainer._updaters[0].states
    arrays: dict[str, onp.ndarray] = {}
    for index, name in opt.index_to_name.items():
        param = opt.trainer._params[index]
        if index in states:
            exp_avg, exp_avg_sq = (s.asnumpy() for s in states[index])
        else:
            exp_avg = exp_avg_sq = onp.zeros(param.shape, dtype=onp.float32)
        arrays[f"{name}.exp_avg"] = exp_avg.astype(onp.float32)
        arrays[f"{name}.exp_avg_sq"] = exp_avg_sq.astype(onp.float32)
    arrays["step"] = onp.asarray(_step_count(opt), dtype=onp.int64)
    return arrays


def load_optimizer_state(opt: MXNetOptimizer, arrays: dict[str, onp.ndarray]) -> None:
    """Restore :func:`optimizer_state`'s arrays on every device's updater."""
    missing = [f"{n}.{k}" for n in opt.name_to_index for k in ("exp_avg", "exp_avg_sq")
               if f"{n}.{k}" not in arrays]
    if missing or "step" not in arrays:
        raise ValueError(f"optimizer state lacks {(missing + ['step'])[:5]}"
                         if "step" not in arrays else f"optimizer state lacks {missing[:5]}")
    step = int(onp.asarray(arrays["step"]))
    for updater, ctx in zip(opt.trainer._updaters, opt.devices):
        for name, index in opt.name_to_index.items():
            shape = opt.trainer._params[index].shape
            state = []
            for key in ("exp_avg", "exp_avg_sq"):
                value = onp.asarray(arrays[f"{name}.{key}"], dtype=onp.float32)
                if value.shape != tuple(shape):
                    raise ValueError(f"optimizer state {name}.{key} has shape {value.shape}, "
                                     f"the parameter {tuple(shape)}")
                state.append(mx.nd.array(value, ctx=ctx, dtype="float32"))
            updater.states[index] = tuple(state)
            updater.states_synced[index] = True
        device_counts = opt.optimizer._all_index_update_counts.setdefault(ctx.device_id, {})
        for index in opt.name_to_index.values():
            device_counts[index] = step
    opt.optimizer.num_update = step
