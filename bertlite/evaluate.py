"""Held-out evaluation: masked-token accuracy, MLM perplexity and NSP accuracy.

The masks of the held-out split are drawn from a fixed seed, so numbers are comparable across
runs, checkpoints and backends.
"""

from __future__ import annotations

import math
import os
from typing import Any

from bertlite.data.batches import ShuffledBatches
from bertlite.data.corpus import resolve_corpus_file
from bertlite.data.loader import BatchIterator, prepare_data
from bertlite.errors import DataError
from bertlite.loss import bert_loss_numpy

#: the seed of the held-out masks and sentence pairs
EVAL_SEED = 1234


def evaluate_batches(model: Any, batches: ShuffledBatches, *, max_batches: int | None = None
                     ) -> dict[str, float]:
    """Metrics of a model (a :class:`bertlite.model.Pretrained`) over one pass of batches.

    ``mlm_accuracy`` counts every prediction slot, ``<unk>`` labels included (what the MLM loss
    trains on); ``mlm_accuracy_known`` leaves out the slots whose label is ``<unk>``, which a
    model can learn to "predict" without knowing any word (``unk_fraction`` of the slots).
    """
    mlm_sum = nsp_sum = weight_sum = correct = nsp_correct = 0.0
    known_sum = known_correct = 0.0
    count = 0
    unk = model.vocab.unk
    for i, batch in enumerate(batches.iter_pass(0)):
        if max_batches is not None and i >= max_batches:
            break
        _, mlm_logits, nsp_logits = model.backend.forward(model.model, batch)
        weights = batch.mlm_weights
        mlm, nsp, _ = bert_loss_numpy(mlm_logits, batch.mlm_labels, weights, nsp_logits,
                                      batch.nsp_labels)
        batch_weight = float(weights.sum())
        mlm_sum += mlm * batch_weight
        weight_sum += batch_weight
        nsp_sum += nsp * len(batch.tokens)
        hits = (mlm_logits.argmax(-1) == batch.mlm_labels) * weights
        known = (batch.mlm_labels != unk) * weights
        correct += float(hits.sum())
        known_sum += float(known.sum())
        known_correct += float((hits * known).sum())
        nsp_correct += float((nsp_logits.argmax(-1) == batch.nsp_labels).sum())
        count += len(batch.tokens)
    mlm_loss = mlm_sum / max(weight_sum, 1e-8)
    return {"mlm_loss": mlm_loss, "mlm_perplexity": math.exp(min(mlm_loss, 700.0)),
            "mlm_accuracy": correct / max(weight_sum, 1e-8),
            "mlm_accuracy_known": known_correct / max(known_sum, 1e-8),
            "unk_fraction": 1.0 - known_sum / max(weight_sum, 1e-8),
            "nsp_loss": nsp_sum / max(count, 1), "nsp_accuracy": nsp_correct / max(count, 1),
            "examples": count}


def _trained_with(model: Any, key: str, default: Any) -> Any:
    return model.metadata.get("training", {}).get(key, default)


def heldout_batches(model: Any, *, corpus: str = "wikitext-2", split: str = "valid",
                    data_dir: str | os.PathLike | None = None, batch_size: int = 128,
                    max_len: int = 64, whole_word_mask: bool | None = None) -> BatchIterator:
    """The held-out split as batches, tokenized with the model's vocabulary (and its WordPiece
    tokenizer, if any), fixed masks (of whole words if the model was trained so, or with
    ``whole_word_mask``)."""
    if max_len > model.config.max_len:
        raise DataError(f"max_len {max_len} exceeds the model's positional table "
                        f"({model.config.max_len}); evaluate with a smaller max_len")
    if whole_word_mask is None:
        whole_word_mask = bool(_trained_with(model, "whole_word_mask", False))
    path = resolve_corpus_file(corpus, split, data_dir=data_dir)
    examples, _ = prepare_data(path, max_len, seed=EVAL_SEED, vocab=model.vocab,
                               whole_word_mask=whole_word_mask)
    return BatchIterator(examples, min(batch_size, len(examples)), seed=EVAL_SEED,
                         shuffle=False)


def evaluate(model: Any, *, corpus: str | None = None, split: str = "valid",
             data_dir: str | os.PathLike | None = None, batch_size: int = 128,
             max_len: int | None = None, backend: str | None = None,
             max_batches: int | None = None, whole_word_mask: bool | None = None
             ) -> dict[str, float]:
    """Masked-token accuracy, MLM perplexity (exp of the mean MLM loss) and NSP accuracy of a
    model (what ``train``/``load`` return) or a checkpoint path, on a held-out split.

    ``corpus`` defaults to the corpus the model was trained on (else WikiText-2), ``max_len``
    to the one it was trained with (else 64), the masking to its (whole words or not).
    """
    if isinstance(model, (str, os.PathLike)):
        from bertlite.checkpoint import load

        model = load(model, backend=backend)
    if corpus is None:
        corpus = str(_trained_with(model, "corpus", "wikitext-2"))
    if max_len is None:
        max_len = int(_trained_with(model, "max_len", 64))
    batches = heldout_batches(model, corpus=corpus, split=split, data_dir=data_dir,
                              batch_size=batch_size, max_len=max_len,
                              whole_word_mask=whole_word_mask)
    return evaluate_batches(model, batches, max_batches=max_batches)
