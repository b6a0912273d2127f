"""``MXNetBackend``: the :class:`bertlite.backend.Backend` interface on MXNet 1.9 Gluon."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import mxnet as mx
import numpy as onp
from mxnet import autograd, init
from mxnet import np as mnp

from bertlite.backend import Backend
from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.optim import OptimizerSettings
from bertlite.params import check_state_dict

from . import step as _step
from .devices import num_gpus, parse_devices
from .model import BERTModel

__all__ = ["MXNetBackend"]


def _as_mx(array: onp.ndarray, ctx: mx.Context) -> Any:
    return mnp.array(array, dtype=array.dtype, ctx=ctx)


class MXNetBackend(Backend):
    """MXNet (Gluon, numpy interface): hybridized ``BERTModel``, per-device shards with a
    kvstore, and PyTorch's Adam/AdamW update (:class:`.step.TorchAdam`)."""

    name = "mxnet"
    framework = "mxnet"

    # -- devices and randomness ---------------------------------------------------------------
    def parse_devices(self, spec: str | Sequence[Any] | None) -> list[Any]:
        return parse_devices(spec)

    def seed(self, seed: int) -> None:
        mx.random.seed(int(seed))

    # -- the model ----------------------------------------------------------------------------
    def build_model(self, config: BERTConfig, devices: Sequence[Any]) -> BERTModel:
        devices = list(devices)
        net = BERTModel.from_config(config)
        net.initialize(init.Xavier(), ctx=devices)
        net.hybridize(static_alloc=True, static_shape=True)
        net.devices = devices
        return net

    def state_dict(self, model: BERTModel) -> dict[str, onp.ndarray]:
        return {name: param.data(param.list_ctx()[0]).asnumpy().astype(onp.float32)
                for name, param in model.canonical_parameters().items()}

    def load_state_dict(self, model: BERTModel, arrays: dict[str, onp.ndarray]) -> None:
        check_state_dict(arrays, model.config)
        for name, param in model.canonical_parameters().items():
            # set_data writes every device's copy
            param.set_data(mnp.array(onp.asarray(arrays[name], dtype=onp.float32),
                                     dtype="float32", ctx=param.list_ctx()[0]))

    # -- training -----------------------------------------------------------------------------
    def create_optimizer(self, model: BERTModel, settings: OptimizerSettings) -> Any:
        return _step.create_optimizer(model, settings)

    def train_step(self, model: BERTModel, optimizer: Any, batch: Batch, lr: float
                   ) -> tuple[Any, Any]:
        return _step.train_step(model, optimizer, batch, lr)

    def optimizer_state(self, optimizer: Any) -> dict[str, onp.ndarray]:
        return _step.optimizer_state(optimizer)

    def load_optimizer_state(self, optimizer: Any, arrays: dict[str, onp.ndarray]) -> None:
        _step.load_optimizer_state(optimizer, arrays)

    # -- inference and checks -----------------------------------------------------------------
    def forward(self, model: BERTModel, batch: Batch
                ) -> tuple[onp.ndarray, onp.ndarray, onp.ndarray]:
        ctx = (model.devices or [mx.cpu()])[0]
        n = batch.tokens.shape[0]
        has_preds = batch.pred_positions.ndim == 2 and batch.pred_positions.shape[1] > 0
        with autograd.predict_mode():
            encoded, mlm, nsp = model(
                _as_mx(batch.tokens, ctx), _as_mx(batch.segments, ctx),
                _as_mx(onp.asarray(batch.valid_lens, dtype=onp.float32), ctx),
                _as_mx(batch.pred_positions, ctx) if has_preds else None)
        mlm = mlm.asnumpy() if has_preds else onp.zeros((n, 0, model.config.vocab_size),
                                                         dtype=onp.float32)
        return encoded.asnumpy(), mlm, nsp.asnumpy()

    def loss_and_grads(self, model: BERTModel, batch: Batch
                       ) -> tuple[float, float, dict[str, onp.ndarray]]:
        return _step.loss_and_grads(model, batch)

    def info(self) -> dict[str, Any]:
        features = mx.runtime.Features()
        wanted = ("CUDA", "CUDNN", "NCCL", "MKLDNN", "BLAS_OPEN", "BLAS_MKL", "OPENMP",
                  "DIST_KVSTORE", "INT64_TENSOR_SIZE")
        return {
            "framework": "mxnet",
            "version": mx.__version__,
            "numpy": onp.__version__,
            "features": {f: features.is_enabled(f) for f in wanted if f in features},
            "gpus": num_gpus(),
            "omp_threads": _omp_threads(),
        }


def _omp_threads() -> str:
    """How many threads MXNet's CPU operators use, as far as the environment says."""
    for var in ("MXNET_OMP_MAX_THREADS", "OMP_NUM_THREADS"):
        if var in os.environ:
            return f"{os.environ[var]} ({var})"
    return f"{max(1, (os.cpu_count() or 2) // 2)} (MXNet's default: half the logical CPUs)"
