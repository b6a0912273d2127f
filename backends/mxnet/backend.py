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
from bertlite.errors import BackendError
from bertlite.memory import SavedTensors
from bertlite.optim import OptimizerSettings
from bertlite.params import check_state_dict

from . import distributed
from . import step as _step
from .devices import num_gpus, parse_devices
from .model import BERTModel

__all__ = ["SAVED_TENSORS", "MXNetBackend"]

#: the tensors this backend's training step keeps for backward (:mod:`bertlite.memory`), read
#: off the fast path's compiled graph (:mod:`.fast`, ``static_alloc``: its forward and backward
#: buffers are planned once and stay allocated) with dropout on, full encoder blocks. Per block
#: and token: the head-split copies of q, k and v, the merged attention output, both dropout
#: inputs and both float32 masks (a product's backward reads both factors), four hidden-sized
#: intermediates of each LayerNorm kernel (:func:`.kernels.layer_norm`: input, centred values,
#: their squares, the scale) -- 16 -- and 4 more that the static plan keeps (the measured slope
#: over layers); per attention score: softmax output, mask, dropped weights and one more
#: (measured over heads); the embeddings' sum and the encoder's input; in the MLM head, its
#: dense layer's input, its LayerNorm kernel's four (the first: the activation) and output,
#: the logits and the log-probabilities (the plan keeps both); at backward's peak, one gradient
#: of those or, in a block, four score-sized and two FFN-sized buffers (forward's transients,
#: which the static plan keeps, and backward's); the LayerNorm kernel's per-token mean,
#: variance, scale and ones (four per norm); the masks as float32 graph inputs.
#: Calibration (``tests/test_scale.py``: growth of peak RSS over two training steps, float32,
#: dropout on; MXNet 1.9's CPU storage manager has no pool -- every array comes from malloc and
#: returns to it, ``MXNET_CPU_MEM_POOL_TYPE`` changes nothing): the plain, imperative path
#: measured within 0.85-1.18x of the estimate for ten configurations of 120-750 MiB (hidden
#: 32-256, 1-6 layers, length 32-256, vocabulary 1,000-20,000, one without dropout) and
#: 0.96-1.01x for three of 18-64 MiB; the fast path, whose last block is sparse, needs 5-45%
#: less (the more, the fewer the layers). Not counted: the allocator's overhead (without a
#: fixed mmap threshold glibc keeps freed blocks: +38% of peak RSS on the plain path, +2% on
#: the fast one), the data pipeline and the framework (a few MiB); every prediction slot counts
#: as used. Mixed precision is not calibrated (the backend refused bf16 on the CPU measured:
#: its oneDNN computed no bfloat16 there); MXNet's bf16 casts around the Dense products and
#: keeps float32 activations, where the estimate halves them.
SAVED_TENSORS = SavedTensors(block_hidden=20, block_ffn=1, block_hidden_float32=2,
                             block_float32=8, block_scores=4, embedding_hidden_float32=2,
                             head_hidden=6, head_vocab_float32=2,
                             backward_head_vocab_float32=1, backward_scores=4, backward_ffn=2,
                             host_mask_bytes=4)  # float32 masks (fast.shard_masks)


def _as_mx(array: onp.ndarray, ctx: mx.Context) -> Any:
    return mnp.array(array, dtype=array.dtype, ctx=ctx)


class MXNetBackend(Backend):
    """MXNet (Gluon, numpy interface): hybridized ``BERTModel``, per-device shards with a
    kvstore, and PyTorch's Adam/AdamW update (:class:`.step.TorchAdam`).

    Several processes: a process started as an MXNet worker (``DMLC_ROLE=worker``,
    ``DMLC_NUM_WORKER`` > 1, e.g. by ``python -m bertlite.launch --workers N -- bertlite
    pretrain --backend mxnet ...``) trains through a ``dist_sync`` kvstore, each worker on its
    own rows of every global batch (:mod:`.distributed`); worker 0 is the main process.

    ``fast`` (default True) is the one switch between the fast path -- the model on the kernels
    of :mod:`.kernels`, hybridized, its training loss in the compiled graph of :mod:`.fast` with
    a sparse last layer -- and the plain one: the book's operations, imperative (float32
    only). Both compute the same losses and gradients to float32 round-off."""

    name = "mxnet"
    framework = "mxnet"

    def __init__(self, fast: bool = True) -> None:
        self.fast = bool(fast)

    # -- devices and randomness ---------------------------------------------------------------
    def parse_devices(self, spec: str | Sequence[Any] | None) -> list[Any]:
        return parse_devices(spec)

    def seed(self, seed: int) -> None:
        mx.random.seed(int(seed))

    # -- the model ----------------------------------------------------------------------------
    def build_model(self, config: BERTConfig, devices: Sequence[Any]) -> BERTModel:
        devices = list(devices)
        net = BERTModel.from_config(config, fast=self.fast)
        net.initialize(init.Xavier(), ctx=devices)
        if self.fast:
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

    def train_step(self, model: BERTModel, optimizer: Any, batch: Batch, lr: float, *,
                   accumulate: int = 1, precision: str = "float32",
                   skip_nonfinite: bool = False, seed: int = 0, step: int = 0
                   ) -> tuple[Any, Any]:
        return _step.train_step(model, optimizer, batch, lr, accumulate=accumulate,
                                precision=precision, skip_nonfinite=skip_nonfinite, seed=seed,
                                step=step)

    def check_train_options(self, devices: Sequence[Any], *, accumulate: int = 1,
                            precision: str = "float32", skip_nonfinite: bool = False) -> None:
        """accumulate: any positive integer; precision: float32 anywhere, bf16 on the CPU,
        fp16 on GPUs (both on the fast path only); skip_nonfinite: yes."""
        super().check_train_options(devices, accumulate=accumulate, precision=precision,
                                    skip_nonfinite=skip_nonfinite)
        try:
            _step.check_precision(precision, list(devices))
            if precision != "float32" and not self.fast:
                raise ValueError(f"precision={precision!r} rewrites the fast path's compiled "
                                 "graph; use MXNetBackend(fast=True) or precision='float32'")
        except ValueError as err:
            raise BackendError(f"the mxnet backend cannot train so: {err}") from None

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

    # -- several processes and memory --------------------------------------------------------
    def setup_processes(self, devices: Sequence[Any]) -> None:
        """As an MXNet worker among several, connect to the distributed kvstore
        (:func:`.distributed.setup`)."""
        distributed.setup(devices[0] if devices else None)

    def is_main_process(self) -> bool:
        """Worker 0 of a distributed kvstore (connecting to it on first use), else True."""
        return distributed.rank() == 0

    def any_process(self, flag: bool) -> bool:
        return distributed.any_process(flag)

    def process_share(self) -> tuple[int, int]:
        return distributed.rank(), distributed.world_size()

    def sum_over_processes(self, value: float) -> float:
        return distributed.sum_over_processes(value)

    def num_replicas(self, devices: Sequence[Any]) -> int:
        return max(1, len(devices)) * distributed.world_size()

    def saved_tensors(self) -> SavedTensors:
        return SAVED_TENSORS

    def free_memory(self, devices: Sequence[Any]) -> int | None:
        """The least free memory of the GPUs among ``devices``; None on the CPU."""
        gpus = [d for d in devices if getattr(d, "device_type", None) == "gpu"]
        if not gpus:
            return None
        try:
            return min(int(mx.context.gpu_memory_info(d.device_id)[0]) for d in gpus)
        except mx.base.MXNetError:
            return None

    def info(self) -> dict[str, Any]:
        features = mx.runtime.Features()
        wanted = ("CUDA", "CUDNN", "NCCL", "MKLDNN", "BLAS_OPEN", "BLAS_MKL", "OPENMP",
                  "DIST_KVSTORE", "INT64_TENSOR_SIZE")
        return {
            "framework": "mxnet",
            "version": mx.__version__,
            "numpy": onp.__version__,
            "devices": [str(d) for d in parse_devices(None)],
            "gpus": num_gpus(),
            "threads": _omp_threads(),
            "distributed": _describe_distributed(),
            "build": {"features": {f: features.is_enabled(f) for f in wanted if f in features}},
        }


def _describe_distributed() -> str:
    """What the environment asks for, without connecting to anything."""
    try:
        kind = distributed.env_kvstore_type()
    except Exception as err:  # a broken environment is reported, not fatal
        return f"misconfigured ({err})"
    if kind is None:
        return "no (one process)"
    return (f"{kind} worker of {os.environ.get('DMLC_NUM_WORKER')}, scheduler "
            f"{os.environ.get('DMLC_PS_ROOT_URI')}:{os.environ.get('DMLC_PS_ROOT_PORT')}")


def _omp_threads() -> str:
    """How many threads MXNet's CPU operators use, as far as the environment says."""
    for var in ("MXNET_OMP_MAX_THREADS", "OMP_NUM_THREADS"):
        if var in os.environ:
            return f"{os.environ[var]} ({var})"
    return f"{max(1, (os.cpu_count() or 2) // 2)} (MXNet's default: half the logical CPUs)"
