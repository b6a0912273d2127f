"""bertlite's PyTorch backend; also the book's PyTorch-tab API, so that
``from bertlite.backends import torch as d2l`` runs the chapter's code."""

from bertlite.registry import require_framework

require_framework("torch")

from .backend import TorchBackend  # noqa: E402
from .d2l import (  # noqa: E402
    Accumulator,
    Animator,
    BERTEncoder,
    BERTModel,
    MaskLM,
    NextSentencePred,
    Timer,
    _get_batch_loss_bert,
    get_tokens_and_segments,
    load_data_wiki,
    try_all_gpus,
    try_gpu,
)

__all__ = [
    "Accumulator", "Animator", "BERTEncoder", "BERTModel", "MaskLM", "NextSentencePred",
    "Timer", "TorchBackend", "_get_batch_loss_bert", "get_tokens_and_segments",
    "load_data_wiki", "try_all_gpus", "try_gpu",
]
