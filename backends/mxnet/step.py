"""One training step over one or more devices, and PyTorch's Adam/AdamW as an MXNet optimizer.

A batch is split over the devices as :func:`bertlite.sharding.device_slices` says; every
shard's loss is its share of the batch loss (:mod:`.loss`), so the gradients that ``trainer``
sums over the devices (through a kvstore when there are several) are the one-device gradient and
the step is ``trainer.step(1)``.

:class:`TorchAdam` is ``torch.optim.Adam`` / ``AdamW`` exactly (bias correction inside the
denominator, decoupled decay for AdamW), written with MXNet's fused ``adam_update``: torch's

    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

is ``adam_update`` at ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` and ``eps * sqrt(1 - b2^t)``
(MXNet's own Adam corrects the learning rate only, so its epsilon acts ``1/sqrt(1 - b2^t)``
times larger than torch's). ``t`` counts each parameter's updates, as torch's state does.

``clip_norm`` is ``torch.nn.utils.clip_grad_norm_`` on the summed gradient (its epsilon 1e-6;
``gluon.utils.clip_global_norm`` adds 1e-8 and, by default, waits for the norm on the host).

How a step divides the global batch (:func:`train_step`): over ``K`` micro-batches
(``accumulate``), run one after another with the gradients added up (``grad_req="add"``); over
the workers of a ``dist_sync`` kvstore (:mod:`.distributed`), each taking its own rows; and each
micro-batch over the process's devices. Every piece's loss uses the whole batch's normalizers
(:func:`shard_losses`), so the pieces' losses and gradients add up to the batch's, and one
``trainer.step(1)`` follows.

Mixed precision (:data:`PRECISION_PLANS`) runs the matrix products of the ``Dense`` layers in
bfloat16 on the CPU (oneDNN) or float16 on GPUs, with float32 weights, gradients, optimizer
state, LayerNorm, softmax and loss (a rewrite of the compiled loss graph,
:func:`.fast.low_precision_dense`); float16 adds dynamic loss scaling (torch's ``GradScaler``
defaults).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon
from mxnet import np as mnp

from bertlite import sharding
from bertlite.data.loader import Batch
from bertlite.optim import OptimizerSettings
from bertlite.params import is_no_decay

from . import distributed
from .fast import loss_graph, shard_masks
from .loss import _get_batch_loss_bert, shard_loss

__all__ = ["MXNetOptimizer", "PRECISION_PLANS", "PrecisionPlan", "TorchAdam", "check_precision",
           "clip_grad_norm", "create_optimizer", "load_optimizer_state", "loss_and_grads",
           "optimizer_state", "shard_losses", "split_batch", "train_step"]

#: torch.nn.utils.clip_grad_norm_'s epsilon
CLIP_EPSILON = 1e-6
#: dynamic loss scaling for float16 (torch.cuda.amp.GradScaler's defaults)
INITIAL_LOSS_SCALE, LOSS_SCALE_GROWTH_INTERVAL = 2.0**16, 2000


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
    """What ``MXNetBackend.create_optimizer`` returns (the mirror of torch's
    ``TorchOptimizer``): a ``gluon.Trainer`` running :class:`TorchAdam` (:attr:`optimizer` is
    the TorchAdam), the settings, the canonical name of every trainer index, and the step's own
    state: the float16 loss scale and how many steps a non-finite loss skipped."""

    def __init__(self, model, settings: OptimizerSettings) -> None:
        net = model
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
        # replicas diverge; with one device Gluon uses none); several worker processes: the
        # dist_sync kvstore sums them over the devices and the workers. update_on_kvstore=False
        # keeps the optimizer (and its state) in every process's trainer, where it can be
        # exported; the kvstore only adds gradients.
        self.kvstore = distributed.get_kvstore()
        self.trainer = gluon.Trainer(net.collect_params(), self.optimizer,
                                     kvstore=self.kvstore or "device", update_on_kvstore=False)
        distributed.prepare_trainer(self.trainer)
        #: float16 loss scale (dynamic) and the updates since it last changed
        self.loss_scale, self.good_steps = INITIAL_LOSS_SCALE, 0
        #: steps whose non-finite loss skipped the update (``skip_nonfinite``)
        self.nonfinite_skips = 0
        by_param = {param.name: name for name, param in params.items()}
        self.index_to_name = {i: by_param[p.name] for i, p in enumerate(self.trainer._params)}
        self.name_to_index = {n: i for i, n in self.index_to_name.items()}

    def __repr__(self) -> str:
        return f"<MXNetOptimizer {self.settings.optimizer} on {self.devices}>"


def create_optimizer(model, settings: OptimizerSettings) -> MXNetOptimizer:
    return MXNetOptimizer(model, settings)


def split_batch(batch: Batch | Sequence[Any], devices: Sequence[mx.Context]) -> list[list[Any]]:
    """Each of the batch's seven arrays as shards over ``devices`` (uneven shards allowed)."""
    return [gluon.utils.split_and_load(a, devices, even_split=False) for a in batch]


def clip_grad_norm(params: Sequence[gluon.Parameter], max_norm: float, scale: float = 1.0
                   ) -> None:
    """torch.nn.utils.clip_grad_norm_ on every device's (already summed) gradients: scale by
    ``min(1, max_norm / (norm + 1e-6))`` where ``norm`` is the global 2-norm. Asynchronous.
    ``scale``: the gradients are the true ones times ``scale`` (loss scaling); the norm is
    measured on the true gradients."""
    per_device = zip(*(p.list_grad() for p in params if p.grad_req != "null"))
    for grads in per_device:
        total = mnp.sqrt(sum((g * g).sum() for g in grads))
        if scale != 1.0:
            total = total / scale
        coef = mnp.minimum(max_norm / (total + CLIP_EPSILON), 1.0)
        for g in grads:
            g *= coef


def _sum_on(arrays: Sequence[Any], ctx: mx.Context) -> Any:
    total = None
    for a in arrays:
        a = a.as_in_ctx(ctx)
        total = a if total is None else total + a
    return total


# -- precision --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionPlan:
    """How a ``precision=`` value runs in MXNet."""

    name: str
    #: dtype of the Dense layers' matrix products (None: float32 throughout)
    dtype: Any
    #: dynamic loss scaling (float16's narrow range)
    loss_scaling: bool
    #: the one device type it runs on (None: any)
    device_type: str | None
    #: why it needs that device type
    reason: str = ""


#: ``precision`` values: float32; bf16 on the CPU (oneDNN; MXNet 1.9 has no bfloat16 GPU
#: kernels); fp16 on GPUs (no float16 matrix products on the CPU)
PRECISION_PLANS = {
    "float32": PrecisionPlan("float32", None, False, None),
    "bf16": PrecisionPlan("bf16", "bfloat16", False, "cpu",
                          "MXNet 1.9 computes in bfloat16 only on the CPU (oneDNN); on GPUs use "
                          "precision='fp16'"),
    "fp16": PrecisionPlan("fp16", "float16", True, "gpu",
                          "MXNet has no float16 matrix products on the CPU; on the CPU use "
                          "precision='bf16' (or 'float32')"),
}


def check_precision(precision: str, devices: Sequence[mx.Context]) -> PrecisionPlan:
    """The plan of ``precision`` (one of :data:`bertlite.backend.PRECISIONS`) on ``devices``;
    ValueError naming what works when these devices cannot run it."""
    plan = PRECISION_PLANS[precision]  # one of PRECISIONS: bertlite.options checks the value
    if plan.device_type is not None:
        wrong = [str(d) for d in devices if d.device_type != plan.device_type]
        if wrong:
            raise ValueError(f"precision={precision!r} runs on {plan.device_type.upper()} "
                             f"devices only, not on {', '.join(wrong)}: {plan.reason}")
    if plan.dtype == "bfloat16" and not mx.runtime.Features().is_enabled("MKLDNN"):
        raise ValueError("precision='bf16' needs an MXNet build with oneDNN (MKLDNN), which "
                         f"this one ({mx.__version__}) lacks; use precision='float32'")
    if plan.dtype == "bfloat16" and not _cpu_computes_bfloat16():
        raise ValueError("precision='bf16' needs a CPU on which oneDNN computes in bfloat16 "
                         "(AVX-512 or newer); this one cannot; use precision='float32'")
    return plan


@functools.cache
def _cpu_computes_bfloat16() -> bool:
    """Whether oneDNN runs a bfloat16 matrix product on this CPU (it has no bfloat16 kernels
    below AVX-512: the product fails when it runs)."""
    from mxnet.contrib.amp.amp import bfloat16

    x = mx.nd.amp_cast(mx.nd.ones((2, 4), ctx=mx.cpu()), dtype=bfloat16)
    try:
        mx.nd.FullyConnected(x, x, no_bias=True, num_hidden=2).wait_to_read()
    except mx.base.MXNetError:
        return False
    return True


# -- one step -----------------------------------------------------------------------------------

def shard_losses(net, shards: Sequence[Sequence[Any]], mlm_weight_total: float,
                 num_examples: int, plan: PrecisionPlan = PRECISION_PLANS["float32"],
                 masks: Sequence[Sequence[Any]] = ()) -> tuple[list[Any], list[Any], list[Any]]:
    """``(mlm_ls, nsp_ls, ls)``, one 0-d loss per device shard (``shards`` as
    :func:`split_batch` gives them), each normalized by the given totals of the WHOLE batch
    (the global batch, across micro-batches and processes): the shares add up to its loss.
    ``masks``: per shard, its dropout masks as host arrays (:func:`shard_masks`, sparse for the
    fast path's graph); none: ``nn.Dropout``."""
    graph = loss_graph(net, plan.dtype, masked=bool(masks))
    if plan.dtype is not None and graph is None:
        raise ValueError(f"precision={plan.name!r} needs the fast, hybridized model (as "
                         "MXNetBackend(fast=True).build_model makes it)")
    mlm_ls, nsp_ls, ls = [], [], []
    for i, shard in enumerate(zip(*shards)):
        ctx = shard[0].ctx
        total = mnp.array(mlm_weight_total, dtype="float32", ctx=ctx)
        device_masks = [_on_device(m, ctx) for m in (masks[i] if masks else ())]
        mlm_l, nsp_l, l = shard_loss(net, graph, shard, total, num_examples,
                                     net.config.vocab_size, device_masks)
        mlm_ls.append(mlm_l)
        nsp_ls.append(nsp_l)
        ls.append(l)
    return mlm_ls, nsp_ls, ls


def _on_device(mask: onp.ndarray, ctx: mx.Context) -> Any:
    """A host mask as an array on ``ctx``: on ``cpu(0)`` without a copy (the NDArray keeps the
    numpy array alive, and it is drawn afresh each step, never written again)."""
    if ctx == mx.cpu() and mask.flags.c_contiguous and mask.flags.aligned:
        return mx.nd.from_numpy(mask, zero_copy=True).as_np_ndarray()
    return mnp.array(mask, dtype="float32", ctx=ctx)


def _trained_params(net) -> list[gluon.Parameter]:
    return [p for p in net.collect_params().values() if p.grad_req != "null"]


def _zero_grads(params: Sequence[gluon.Parameter],
                devices: Sequence[mx.Context] | None = None) -> None:
    """Zero the gradients (on ``devices`` only, if given) and mark them fresh, as a backward
    pass would: a device that got no rows of this step contributes a zero gradient."""
    for param in params:
        for data, grad in zip(param.list_data(), param.list_grad()):
            if devices is None or grad.ctx in devices:
                grad[()] = 0
                data._fresh_grad = True


def _finite(*values: Any) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def _grads_finite(params: Sequence[gluon.Parameter], ctx: mx.Context) -> bool:
    """Whether every (already summed) gradient is finite; waits for them."""
    checks = [(p.grad(ctx) * 0).sum() for p in params]  # inf * 0 and nan * 0 are nan
    return _finite(sum(c.as_in_ctx(ctx) for c in checks))


def _update(net, opt: MXNetOptimizer, scale: float | None) -> bool:
    """Sum the gradients over devices and workers, clip, and update; False when a float16
    overflow skipped the update (the loss scale is then halved)."""
    trainer, clip = opt.trainer, opt.settings.clip_norm
    if scale is None and clip is None:
        trainer.step(1)
        return True
    trainer.allreduce_grads()
    params = _trained_params(net)
    if scale is not None:
        # the summed gradients are the same in every process: every one decides alike
        if not _grads_finite(params, opt.devices[0]):
            opt.loss_scale, opt.good_steps = max(1.0, opt.loss_scale / 2), 0
            _zero_grads(params)
            return False
        opt.good_steps += 1
        if opt.good_steps >= LOSS_SCALE_GROWTH_INTERVAL:
            opt.loss_scale, opt.good_steps = opt.loss_scale * 2, 0
    if clip is not None:
        clip_grad_norm(params, clip, scale=scale or 1.0)
    trainer.update(scale or 1)  # rescale_grad = 1 / scale
    return True


def train_step(model, optimizer: MXNetOptimizer, batch: Batch, lr: float, *, accumulate: int = 1,
               precision: str = "float32", skip_nonfinite: bool = False, seed: int = 0,
               step: int = 0) -> tuple[Any, Any]:
    """Forward with dropout, the core loss per piece of the batch, backward, one update at
    ``lr`` (see :meth:`bertlite.backend.Backend.train_step` for the options).

    The global batch is cut as :func:`bertlite.sharding.step_pieces` says: this process runs
    its ``accumulate`` parts one after another, each split over its devices, every piece's loss
    with the whole batch's normalizers and the dropout masks of its global rows at ``(seed,
    step)`` (:mod:`bertlite.dropout`, inputs of the compiled graph); gradients are added up over
    the parts (``grad_req="add"``), summed over devices and workers by the trainer's kvstore,
    and one update follows. Returns the whole batch's ``(mlm_loss, nsp_loss)`` as 0-d arrays,
    still computing unless ``skip_nonfinite`` (which waits for them to decide, the same in every
    process: the loss is the sum over all of them)."""
    devices = optimizer.devices
    plan = check_precision(precision, devices)
    rank, workers = distributed.rank(), distributed.world_size()
    mlm_weight_total, num_rows = sharding.normalizers(batch.mlm_weights)
    parts = sharding.step_pieces(num_rows, accumulate=accumulate, num_devices=len(devices),
                                 rank=rank, num_processes=workers)
    params = _trained_params(model)
    if len(parts) > 1 and any(p.grad_req != "add" for p in params):
        for p in params:  # once: later steps zero the gradients instead
            p.grad_req = "add"
    if any(p.grad_req == "add" for p in params):
        model.collect_params().zero_grad()
    scale = optimizer.loss_scale if plan.loss_scaling else None
    length = batch.tokens.shape[1]
    sparse = model.config.dropout > 0 and loss_graph(model, plan.dtype, True) is not None
    every_piece = [rows for pieces in parts for rows in pieces]
    masks = shard_masks(model, seed, step, every_piece, length,
                        batch.pred_positions if sparse else None, batch.valid_lens)
    mlm_parts, nsp_parts, used = [], [], set()
    for pieces in parts:
        # a part shorter than the device list runs on its first devices only
        part_devices = devices[:len(pieces)]
        used.update(part_devices)
        shards = [[mnp.array(a[rows], dtype=a.dtype, ctx=ctx)
                   for rows, ctx in zip(pieces, part_devices)] for a in batch]
        part_masks, masks = masks[:len(pieces)], masks[len(pieces):]
        with autograd.record():
            mlm_ls, nsp_ls, ls = shard_losses(model, shards, mlm_weight_total, num_rows, plan,
                                              part_masks)
            if scale is not None:
                ls = [l * scale for l in ls]
        for l in ls:
            l.backward()
        mlm_parts.extend(mlm_ls)
        nsp_parts.extend(nsp_ls)
    idle = [d for d in devices if d not in used]
    if idle:
        _zero_grads(params, idle)
    zero = mnp.zeros((), dtype="float32", ctx=devices[0])
    mlm = _sum_on(mlm_parts, devices[0]) if mlm_parts else zero
    nsp = _sum_on(nsp_parts, devices[0]) if nsp_parts else zero
    if workers > 1:
        total = distributed.all_reduce_sum(mnp.stack([mlm, nsp]))
        mlm, nsp = total[0], total[1]
    if skip_nonfinite and not _finite(mlm, nsp):
        _zero_grads(params)
        optimizer.nonfinite_skips += 1
        return mlm, nsp
    optimizer.trainer.set_learning_rate(lr)
    _update(model, optimizer, scale)
    return mlm, nsp


def loss_and_grads(net, batch: Batch, devices: Sequence[mx.Context] | None = None
                   ) -> tuple[float, float, dict[str, onp.ndarray]]:
    """The batch's MLM and NSP losses and the gradients (summed over the devices' shards, by
    canonical name), dropout off, no update."""
    devices = list(devices or net.devices)
    shards = split_batch(batch, devices)
    if any(p.grad_req == "add" for p in _trained_params(net)):  # trained with accumulate
        net.collect_params().zero_grad()
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


def optimizer_state(optimizer: MXNetOptimizer) -> dict[str, onp.ndarray]:
    """``"<canonical>.exp_avg"``, ``"<canonical>.exp_avg_sq"`` (zeros before the first step)
    and ``"step"`` as numpy arrays, from the first device's updater."""
    states = optimizer.trainer._updaters[0].states
    arrays: dict[str, onp.ndarray] = {}
    for index, name in optimizer.index_to_name.items():
        param = optimizer.trainer._params[index]
        if index in states:
            exp_avg, exp_avg_sq = (s.asnumpy() for s in states[index])
        else:
            exp_avg = exp_avg_sq = onp.zeros(param.shape, dtype=onp.float32)
        arrays[f"{name}.exp_avg"] = exp_avg.astype(onp.float32)
        arrays[f"{name}.exp_avg_sq"] = exp_avg_sq.astype(onp.float32)
    arrays["step"] = onp.asarray(_step_count(optimizer), dtype=onp.int64)
    return arrays


def load_optimizer_state(optimizer: MXNetOptimizer, arrays: dict[str, onp.ndarray]) -> None:
    """Restore :func:`optimizer_state`'s arrays on every device's updater."""
    missing = [f"{n}.{k}" for n in optimizer.name_to_index for k in ("exp_avg", "exp_avg_sq")
               if f"{n}.{k}" not in arrays]
    if missing or "step" not in arrays:
        raise ValueError(f"optimizer state lacks {(missing + ['step'])[:5]}"
                         if "step" not in arrays else f"optimizer state lacks {missing[:5]}")
    step = int(onp.asarray(arrays["step"]))
    for updater, ctx in zip(optimizer.trainer._updaters, optimizer.devices):
        for name, index in optimizer.name_to_index.items():
            shape = optimizer.trainer._params[index].shape
            state = []
            for key in ("exp_avg", "exp_avg_sq"):
                value = onp.asarray(arrays[f"{name}.{key}"], dtype=onp.float32)
                if value.shape != tuple(shape):
                    raise ValueError(f"optimizer state {name}.{key} has shape {value.shape}, "
                                     f"the parameter {tuple(shape)}")
                state.append(mx.nd.array(value, ctx=ctx, dtype="float32"))
            updater.states[index] = tuple(state)
            updater.states_synced[index] = True
        device_counts = optimizer.optimizer._all_index_update_counts.setdefault(ctx.device_id, {})
        for index in optimizer.name_to_index.values():
            device_counts[index] = step
    optimizer.optimizer.num_update = step
