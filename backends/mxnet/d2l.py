"""The book's MXNet-tab API: with ``from d2l import mxnet as d2l`` replaced by
``from bertlite.backends import mxnet as d2l`` every cell of the chapter runs unchanged.

Batches come from bertlite's numpy pipeline as ``mxnet.np`` arrays (int32 ids, float32
lengths and weights) that ``gluon.utils.split_and_load`` takes; ``_get_batch_loss_bert`` is
bertlite's per-shard loss (shard losses add up to the batch loss, see :mod:`.loss`).
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as onp
from mxnet import np as mnp

from bertlite import data as _data
from bertlite.book import Accumulator, Animator, ConvertedBatches, Timer
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
    "_get_batch_loss_bert", "get_tokens_and_segments", "load_data_wiki", "to_mxnet",
    "try_all_gpus", "try_gpu",
]


def to_mxnet(array: onp.ndarray, ctx: mx.Context | None = None) -> Any:
    """A numpy batch array as an ``mxnet.np`` array: integers as int32, floats as float32."""
    dtype = "int32" if onp.issubdtype(array.dtype, onp.integer) else "float32"
    return mnp.array(array, dtype=dtype, ctx=ctx or mx.cpu())


def load_data_wiki(batch_size: int, max_len: int, **kwargs: Any
                   ) -> tuple[ConvertedBatches, Vocab]:
    """The book's ``load_data_wiki``: ``(train_iter, vocab)``, ``train_iter`` re-iterable over
    minibatches of seven ``mxnet.np`` arrays in the book's order. Keyword arguments go to
    :func:`bertlite.data.load_data_wiki` (``corpus``, ``data_dir``, ``seed``, ...)."""
    batches, vocab = _data.load_data_wiki(batch_size, max_len, **kwargs)
    return ConvertedBatches(batches, to_mxnet), vocab
