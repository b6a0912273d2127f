"""bertlite's PyTorch backend; also the book's PyTorch-tab API, so that
``from bertlite.backends import torch as d2l`` runs the chapter's code."""

from bertlite.registry import require_framework

require_framework("torch")

from .backend import TorchBackend  # noqa: E402
from .d2l import (  # noqa: E402
    Accumulator,
    AddNorm,
    Animator,
    BERTEncoder,
    BERTModel,
    EncoderBlock,
    MaskLM,
    MultiHeadAttention,
    NextSentencePred,
    PositionWiseFFN,
    Timer,
    _get_batch_loss_bert,
    get_tokens_and_segments,
    load_data_wiki,
    to_torch,
    try_all_gpus,
    try_gpu,
)
from .devices import parse_devices  # noqa: E402
from .interop import from_d2l, to_d2l  # noqa: E402

__all__ = [
    "Accumulator", "AddNorm", "Animator", "BERTEncoder", "BERTModel", "EncoderBlock",
    "MaskLM", "MultiHeadAttention", "NextSentencePred", "PositionWiseFFN", "Timer",
    "TorchBackend", "_get_batch_loss_bert", "from_d2l", "get_tokens_and_segments",
    "load_data_wiki", "parse_devices", "to_d2l", "to_torch", "try_all_gpus", "try_gpu",
]
