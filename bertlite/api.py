"""``bertlite.train``: data, model, schedule, summary, plot and checkpoints in one call."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertlite import checkpoint as ckpt
from bertlite import lock as _lock
from bertlite.backend import Backend
from bertlite.config import BERTConfig, resolve_config
from bertlite.data.batches import ShuffledBatches
from bertlite.data.loader import load_data_wiki
from bertlite.data.tokenizer import (
    DEFAULT_WORDPIECE_VOCAB_SIZE,
    WordPieceTokenizer,
    check_tokenizer_kind,
)
from bertlite.errors import BertliteError, DataError
from bertlite.memory import check_fits, estimate_memory
from bertlite.model import Pretrained
from bertlite.optim import OptimizerSettings
from bertlite.options import check_overrides, check_train_arguments, run_defaults
from bertlite.params import init_params
from bertlite.registry import get_backend
from bertlite.resume import check_writable, resume_state, write_training_checkpoint
from bertlite.signals import StopRequests, raise_interrupted
from bertlite.trainer import History, TrainState, summary_lines, train_bert

DEFAULT_PLOT = "bertlite-loss.png"


@dataclass
class TrainResult(Pretrained):
    """The trained model plus how training went."""

    history: History = field(default_factory=History)
    num_steps: int = 0
    seed: int = 0

    @property
    def mlm_loss(self) -> float:
        """Mean MLM loss over the run (what the book prints)."""
        return self.history.mean_mlm_loss

    @property
    def nsp_loss(self) -> float:
        return self.history.mean_nsp_loss

    @property
    def pairs_per_sec(self) -> float:
        return self.history.pairs_per_sec

    def summary(self) -> str:
        return "\n".join(summary_lines(self.history,
                                       self.backend.describe_devices(self.devices)))


@_lock.releases_locks
def train(backend: str | Backend | None = None, *, corpus: str = "wikitext-2",
          data_dir: str | os.PathLike | None = None, split: str = "train",
          config: str | BERTConfig | dict = "tiny", batch_size: int | None = None,
          max_len: int = 64, num_steps: int | None = None, lr: float | None = None,
          optimizer: str = "adam", weight_decay: float = 0.0, schedule: str | None = None,
          warmup_steps: int | None = None,
          clip_norm: float | None = None, devices: Any = None, seed: int | None = None,
          masking: str = "static", plot: str | os.PathLike | None = DEFAULT_PLOT,
          progress: bool = True, verbose: bool = True, max_time: float | None = None,
          checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          keep_checkpoints: int = 3, resume: bool = False, eval_every: int | None = None,
          eval_split: str = "valid", eval_batches: int | None = None,
          tokenizer: str | WordPieceTokenizer = "word",
          wordpiece_vocab_size: int = DEFAULT_WORDPIECE_VOCAB_SIZE,
          whole_word_mask: bool = False, accumulate: int = 1, precision: str = "float32",
          on_nan: str = "stop", dropout: float | None = None,
          data: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None,
          format: str | None = None, save: str | os.PathLike | None = None,
          override_resume: Any = None, init: str | os.PathLike | None = None) -> TrainResult:
    """Pretrain a BERT (MLM + NSP) with the book's schedule: ``num_steps`` Adam steps at ``lr``.

    ``batch_size``, ``num_steps``, ``lr``, ``warmup_steps``, ``schedule`` left None are the
    book's (512, 50, 0.01, 0, constant) except on the shipped sample corpus: the demo's, printed
    (:data:`bertlite.options.DEMO_DEFAULTS`), so that its encodings are context-dependent.

    ``backend`` is ``"torch"`` or ``"mxnet"`` (or ``$BERTLITE_BACKEND``). The data is WikiText-2
    (``corpus="sample"`` for the small corpus shipped with bertlite), the model a preset
    (``"tiny"`` is the book's) or a BERTConfig. Prints the book's summary lines, writes the loss
    plot to ``plot`` (None to skip), and with ``checkpoint_dir`` saves every
    ``checkpoint_every`` steps and at the end; ``resume=True`` continues from the latest
    checkpoint there, exactly as if never interrupted. ``eval_every`` evaluates on the held-out
    ``eval_split`` (masked-token accuracy, perplexity, NSP accuracy) into the history and plot.
    ``tokenizer="wordpiece"`` trains a WordPiece vocabulary of at most ``wordpiece_vocab_size``
    pieces on the split instead of the book's word vocabulary (``pip install
    "bertlite[wordpiece]"``; it is saved in checkpoints as ``tokenizer.json``);
    ``whole_word_mask`` masks all pieces of a word together. ``dropout`` (in [0, 1)) replaces
    the config's dropout probability (the book's 0.2 in ``"tiny"``). ``init`` (a local
    ``transformers`` BERT folder, see :func:`bertlite.from_hf`) continues pretraining from its
    weights, config and WordPiece tokenizer (the data is tokenized with it; ``config`` and
    ``tokenizer`` must stay at their defaults).

    Scaling: ``batch_size`` is the global batch of one optimizer step, whatever runs it.
    ``accumulate=K`` computes it as K micro-batches one after another (the memory of a K times
    smaller batch, the update of the whole one); ``precision="bf16"`` (CPU or GPU) or
    ``"fp16"`` (CUDA) trains in mixed precision; launched with ``torchrun``, the torch backend
    trains with DistributedDataParallel, each process computing its share of every batch (only
    the main process prints, plots and writes checkpoints). A NaN or infinite loss stops the
    run (``on_nan="stop"``, the last checkpoint is kept) or skips that update
    (``on_nan="skip"``, recorded in ``history.skipped``). When the backend knows the device's
    free memory, a configuration that cannot fit fails with :class:`MemoryError` before
    training starts (see :func:`bertlite.memory.estimate_memory`).

    Reliability: every argument is checked before any work (:class:`OptionError`), and so are
    the outputs written after training (``plot``'s format and folder, ``save``). ``resume``
    refuses a checkpoint of other settings (listing them) unless each changed optimizer
    setting is named in ``override_resume`` (e.g. ``["lr"]``; recorded in the checkpoint).
    SIGTERM or SIGINT stops after the current step, writes a checkpoint (with
    ``checkpoint_dir``) and raises :class:`TrainingInterrupted` naming it; a second signal
    stops at once. ``save`` writes the final model as a checkpoint folder (before the plot);
    if an output fails after training, the others are still written and :class:`OutputError`
    (with the result as ``.result``) says where the model is.
    """
    batch_size, num_steps, lr, warmup_steps, schedule, demo = run_defaults(locals())
    check_train_arguments(locals())
    overrides = check_overrides(override_resume)
    init_weights = None
    if init is not None:  # before any lock or data: a bad folder fails first
        config, init_weights, tokenizer = _init_from(init, config, tokenizer,
                                                     0 if seed is None else int(seed))
    be = get_backend(backend)
    seed = 0 if seed is None else int(seed)
    settings = OptimizerSettings(lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                                 clip_norm=clip_norm, schedule=schedule,
                                 warmup_steps=warmup_steps, total_steps=num_steps)
    if isinstance(config, str):
        resolve_config(config, 1)  # an unknown preset fails before the data is read
    devs = be.parse_devices(devices)
    be.check_train_options(devs, accumulate=accumulate, precision=precision,
                           skip_nonfinite=on_nan == "skip")
    be.setup_processes(devs)  # join the other processes (torchrun, MXNet workers), if any
    main = be.is_main_process()  # the one process that prints, plots and writes checkpoints
    if demo and verbose and main:
        print(demo, flush=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        check_writable(ckpt_dir)
        if main:  # one run at a time in a checkpoint directory (released when train ends)
            _lock.acquire(ckpt_dir)

    check_tokenizer_kind(tokenizer)
    if data is not None:
        batches, vocab, corpus = _prepared_batches(data, format, batch_size, max_len, seed,
                                                   masking, tokenizer, wordpiece_vocab_size,
                                                   whole_word_mask)
        whole_word_mask = bool(batches.data.settings["whole_word_mask"])
    else:  # (eval_data= without data= was refused by check_train_arguments)
        batches, vocab = load_data_wiki(batch_size, max_len, corpus=corpus, data_dir=data_dir,
                                        split=split, seed=seed, masking=masking,
                                        tokenizer=tokenizer,
                                        wordpiece_vocab_size=wordpiece_vocab_size,
                                        whole_word_mask=whole_word_mask)
    if isinstance(tokenizer, WordPieceTokenizer) and vocab.tokenizer is not None:
        vocab.tokenizer.special_names = dict(tokenizer.special_names)  # init=: [MASK] ...
    model_config = resolve_config(config, len(vocab), max_len=max_len)
    if dropout is not None:
        model_config = model_config.replace(dropout=float(dropout))
    free = be.free_memory(devs)
    if free is not None:  # fail before the model is built, not at the first step
        check_fits(estimate_memory(model_config, -(-batch_size // accumulate), max_len,
                                   precision=precision, optimizer=settings.optimizer,
                                   num_devices=be.num_replicas(devs),
                                   saved_tensors=be.saved_tensors()),
                   free, batch_size=batch_size, max_len=max_len)
    be.seed(seed)
    net = be.build_model(model_config, devs)
    be.load_state_dict(net, init_params(model_config, seed) if init_weights is None
                       else init_weights)
    opt = be.create_optimizer(net, settings)
    training = {"corpus": str(corpus), "split": split, "batch_size": batch_size,
                "max_len": max_len, "seed": seed, "masking": masking, "num_steps": num_steps,
                "tokenizer": vocab.tokenizer.kind if vocab.tokenizer is not None else "word",
                "whole_word_mask": bool(whole_word_mask), "accumulate": accumulate,
                "precision": precision,
                "optimizer": settings.to_dict(), "corpus_digest": _corpus_digest(batches),
                "run": ckpt.new_run_id(),
                **({"init": str(Path(init).resolve())} if init is not None else {})}
    result = TrainResult(net, be, vocab, model_config, devs, metadata={"training": training},
                         num_steps=num_steps, seed=seed)
    state = None
    if resume and ckpt_dir is not None:
        state = resume_state(ckpt_dir, result, opt, training, settings, overrides)
        if state is not None:  # the run goes on: its checkpoints keep its id (for pruning)
            training["run"] = ckpt.latest_run_id(ckpt_dir) or training["run"]
    state = state or TrainState()

    callbacks = []
    if eval_every is not None and main:
        from bertlite.evaluate import evaluate_batches, heldout_batches

        if data is not None:
            heldout = _prepared_heldout(eval_data, format, max_len, vocab, whole_word_mask)
        else:
            heldout = heldout_batches(result, corpus=corpus, split=eval_split,
                                      data_dir=data_dir, max_len=max_len,
                                      whole_word_mask=whole_word_mask)

        def evaluate_now(st: TrainState) -> None:
            if st.step % eval_every == 0 or st.step == num_steps:
                metrics = evaluate_batches(result, heldout, max_batches=eval_batches)
                st.history.eval.append({"step": st.step, **metrics})

        callbacks.append(evaluate_now)
    if ckpt_dir is not None and main:
        every = checkpoint_every or num_steps

        def save_checkpoint(st: TrainState) -> None:
            if st.step % every == 0 or st.step == num_steps:
                write_training_checkpoint(ckpt_dir, result, st, opt, settings, training,
                                     keep_checkpoints)

        callbacks.append(save_checkpoint)
    last: Path | None = None
    # signals stay requests to stop until the outputs are written: a run that finished is kept
    with StopRequests(announce=main) as stop:
        state = train_bert(batches, be, net, opt, settings, num_steps, seed=seed, state=state,
                           devices_text=be.describe_devices(devs), progress=progress,
                           max_time=max_time, callbacks=callbacks, accumulate=accumulate,
                           precision=precision, on_nan=on_nan, stop=stop)
        if ckpt_dir is not None:  # the main process writes it; every process names it
            last = ckpt_dir / f"step-{state.step:06d}"
            if main and state.step not in [step for step, _ in ckpt.list_checkpoints(ckpt_dir)]:
                write_training_checkpoint(ckpt_dir, result, state, opt, settings, training,
                                     keep_checkpoints)  # stopped early
        result.history = state.history
        if state.stopped_by == "signal" and state.step < num_steps:
            raise_interrupted(stop.signum, state.step, num_steps, last, announce=main)
        if verbose and main:
            print(result.summary(), flush=True)
        if main:
            _write_outputs(result, save, plot, last,
                           f"{be.name}, {model_config.num_layers} layers, batch {batch_size} x "
                           f"{max_len}")
    return result


class OutputError(BertliteError):
    """Training finished but an output (``save``, ``plot``) could not be written; ``result``
    is the trained model, and the message says where it was written."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


def _write_outputs(result: TrainResult, save: str | os.PathLike | None,
                   plot: str | os.PathLike | None, last: Path | None, title: str) -> None:
    """The model first, then the plot; a failure of one does not stop the other, and the error
    names where the trained model is."""
    failed, model_at = [], last
    if save is not None:
        try:
            result.save(save)
            model_at = Path(save)
        except (OSError, BertliteError) as err:
            failed.append(f"the model could not be saved to {save} ({err})")
    if plot is not None:
        from bertlite.plot import plot_history

        try:
            plot_history(result.history, plot, title=title)
        except (OSError, ValueError) as err:
            failed.append(f"the plot could not be written to {plot} ({err})")
    if failed:
        where = (f"the trained model is in {model_at}" if model_at is not None else
                 "the trained model is only in memory (OutputError.result); save it with "
                 "result.save(path)")
        raise OutputError(f"training finished, but {'; '.join(failed)}; {where}", result)


def _init_from(init: str | os.PathLike, config: Any, tokenizer: Any, seed: int
               ) -> tuple[BERTConfig, dict[str, Any], WordPieceTokenizer]:
    """The config, weights and tokenizer that ``train(init=...)`` starts from."""
    from bertlite.hf import load_init

    if tokenizer != "word" or config != "tiny":
        raise ValueError("init= takes the config and the tokenizer from the transformers folder: "
                         "leave config= and tokenizer= at their defaults")
    init_config, weights, vocab, meta = load_init(init, seed)
    if vocab.tokenizer is None:
        raise DataError(f"{init} has a word-level tokenizer; continued pretraining needs a "
                        "WordPiece tokenizer (the corpus is tokenized with it)")
    return init_config, weights, vocab.tokenizer


def _prepared_batches(data: str | os.PathLike, format: str | None, batch_size: int,
                      max_len: int, seed: int, masking: str, tokenizer: Any,
                      wordpiece_vocab_size: int, whole_word_mask: bool) -> tuple[Any, Any, str]:
    """Batches, vocabulary and name of ``data=``: a prepared folder, or a corpus prepared
    first."""
    from bertlite.data.prepared import PreparedBatches, open_data

    vocab = None
    if isinstance(tokenizer, WordPieceTokenizer):  # init=: the imported tokenizer's pieces
        vocab, tokenizer = tokenizer.to_vocab(), tokenizer.kind
    prepared = open_data(data, format=format, max_len=max_len, seed=seed, tokenizer=tokenizer,
                         wordpiece_vocab_size=wordpiece_vocab_size,
                         whole_word_mask=whole_word_mask, vocab=vocab)
    batches = PreparedBatches(prepared, batch_size, seed=seed, masking=masking)
    return batches, prepared.vocab, str(prepared.folder)


def _prepared_heldout(eval_data: str | os.PathLike, format: str | None, max_len: int,
                      vocab: Any, whole_word_mask: bool) -> Any:
    """The held-out batches of ``eval_data=`` (fixed masks and order, the training vocab;
    check_train_arguments made sure it is given)."""
    from bertlite.data.prepared import PreparedBatches, open_data
    from bertlite.evaluate import EVAL_SEED

    prepared = open_data(eval_data, format=format, max_len=max_len, seed=EVAL_SEED,
                         vocab=vocab, whole_word_mask=whole_word_mask)
    return PreparedBatches(prepared, min(128, len(prepared)), seed=EVAL_SEED, shuffle=False)


def _corpus_digest(batches: ShuffledBatches) -> str:
    """A short fingerprint of the prepared data, so a resume cannot silently switch corpora."""
    import hashlib

    if hasattr(batches, "digest"):  # a prepared folder: its manifest's key
        return str(batches.digest)

    digest = hashlib.sha1()
    ex = batches.examples
    for array in (ex.tokens, ex.segments, ex.nsp_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def info(config: str | None = None) -> dict[str, Any]:
    """Versions, backends (installed or not) and their devices; with ``config``, its size and
    the chance-level losses that answer the book's first exercise."""
    from bertlite._version import __version__
    from bertlite.install import install_command
    from bertlite.registry import available_backends, installed_backends

    report: dict[str, Any] = {"bertlite": __version__, "python": sys.version.split()[0],
                              "platform": platform.platform(), "numpy": np.__version__,
                              "backends": {}}
    installed = set(installed_backends())
    for name in available_backends():
        if name not in installed:
            report["backends"][name] = {"installed": False,
                                        "install": install_command(name)}
            continue
        try:
            report["backends"][name] = {"installed": True, **get_backend(name).info()}
        except Exception as err:  # a broken backend is reported, not fatal
            report["backends"][name] = {"installed": False, "error": str(err)}
    if config is not None:
        cfg = resolve_config(config, 20000)
        mlm, nsp = cfg.chance_losses()
        report["config"] = {"name": config, **cfg.to_dict(),
                            "parameters (vocab 20000)": cfg.num_parameters(),
                            "chance MLM loss ln|V| (vocab 20000)": round(mlm, 3),
                            "chance NSP loss ln 2": round(nsp, 3)}
    return report
