"""Held-out evaluation: masked-token accuracy, MLM perplexity and NSP accuracy.

The masks of the held-out split are drawn from a fixed seed, so numbers are comparable across
runs, checkpoints and backends.
"""

from __future__ import annotations

import math
import os
from typing import Any

from bertlite.data.corpus import resolve_corpus_file
from bertlite.data.loader import BatchIterator, prepare_data
from bertlite.loss import bert_loss_numpy

#: the seed of the held-out masks and sentence pairs
EVAL_SEED = 1234


def evaluate_batches(model: Any, batches: BatchIterator, *, max_batches: int | None = None
                     ) -> dict[str, float]:
    """Metrics of a model (a :class:`bertlite.model.Pretrained`) over one pass of batches."""
    mlm_sum = nsp_sum = weight_sum = correct = nsp_correct = 0.0
    count = 0
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
        correct += float(((mlm_logits.argmax(-1) == batch.mlm_labels) * weights).sum())
        nsp_correct += float((nsp_logits.argmax(-1) == batch.nsp_labels).sum())
        count += len(batch.tokens)
    mlm_loss = mlm_sum / max(weight_sum, 1e-8)
    return {"mlm_loss": mlm_loss, "mlm_perplexity": math.exp(min(mlm_loss, 700.0)),
            "mlm_accuracy": correct / max(weight_sum, 1e-8), "nsp_loss": nsp_sum / max(count, 1),
            "nsp_accuracy": nsp_correct / max(count, 1), "examples": count}


def heldout_batches(model: Any, *, corpus: str = "wikitext-2", split: str = "valid",
                    data_dir: str | os.PathLike | None = None, batch_size: int = 128,
                    max_len: int = 64) -> BatchIterator:
    """The held-out split as batches, tokenized with the model's vocabulary, fixed masks."""
    path = resolve_corpus_file(corpus, split, data_dir=data_dir)
    examples, _ = prepare_data(path, max_len, seed=EVAL_SEED, vocab=model.vocab)
    return BatchIterator(examples, min(batch_size, len(examples)), seed=EVAL_SEED,
                         shuffle=False)


def evaluate(model: Any, *, corpus: str = "wikitext-2", split: str = "valid",
             data_dir: str | os.PathLike | None = None, batch_size: int = 128,
             max_len: int | None = None, backend: str | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Masked-token accuracy, MLM perplexity (exp of the mean MLM loss) and NSP accuracy of a
    model (what ``train``/``load`` return) or a checkpoint path, on a held-out split."""
    if isinstance(model, (str, os.PathLike)):
        from bertlite.checkpoint import load

        model = load(model, backend=backend)
    if max_len is None:
        max_len = int(model.metadata.get("training", {}).get("max_len", 64))
    batches = heldout_batches(model, corpus=corpus, split=split, data_dir=data_dir,
                              batch_size=batch_size, max_len=max_len)
    return evaluate_batches(model, batches, max_batches=max_batches)
