"""The book's PyTorch-tab API ("Dive into Deep Learning", BERT pretraining), on bertlite.

Replace ``from d2l import torch as d2l`` with ``from bertlite.backends import torch as d2l``
and the chapter's ``#@tab pytorch`` / ``#@tab all`` cells run unchanged, with bertlite's data
pipeline, model and masked loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bertlite.book import Accumulator, Animator, ConvertedBatches, Timer
from bertlite.data import load_data_wiki as _load_data_wiki
from bertlite.data.corpus import get_tokens_and_segments
from bertlite.data.vocab import Vocab

from .devices import try_all_gpus, try_gpu
from .loss import _get_batch_loss_bert
from .model import (
    AddNorm,
    BERTEncoder,
    BERTModel,
    EncoderBlock,
    MaskLM,
    MultiHeadAttention,
    NextSentencePred,
    PositionWiseFFN,
)

__all__ = [
    "Accumulator", "AddNorm", "Animator", "BERTEncoder", "BERTModel", "EncoderBlock", "MaskLM",
    "MultiHeadAttention", "NextSentencePred", "PositionWiseFFN", "Timer",
    "_get_batch_loss_bert", "get_tokens_and_segments", "load_data_wiki", "to_torch",
    "try_all_gpus", "try_gpu",
]


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A batch array as the book's tab has it: integer arrays (tokens, segments, positions,
    labels) as int64, since the book's ``nn.CrossEntropyLoss`` needs Long labels; floats
    (valid_lens, weights) as float32."""
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(array.astype(np.int64))
    return torch.from_numpy(np.array(array, dtype=np.float32))


def load_data_wiki(batch_size: int, max_len: int, **kwargs: Any
                   ) -> tuple[ConvertedBatches, Vocab]:
    """The book's ``load_data_wiki``: WikiText-2 (from ``$BERTLITE_DATA/wikitext-2``, fetched
    when absent) as a re-iterable of torch-tensor batches in the book's field order, and the
    vocabulary. ``kwargs`` go to :func:`bertlite.data.load_data_wiki` (``seed``, ``corpus``,
    ``data_dir``, ``masking``, ...)."""
    batches, vocab = _load_data_wiki(batch_size, max_len, **kwargs)
    return ConvertedBatches(batches, to_torch), vocab


