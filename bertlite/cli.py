"""The ``bertlite`` command: pretrain, prepare, encode, evaluate, plan, info.

Usage errors print one line (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bertlite.cli_status import status_line
from bertlite.config import PRESETS

_FORMATS = ("wikitext", "lines", "text", "jsonl")


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h``."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use 90, 90s, 10m, 2h)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertlite", description="BERT pretraining (MLM + NSP) on PyTorch or MXNet.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pretrain", help="pretrain a BERT and print the book's summary",
        description="Pretrain a BERT (MLM + NSP) and print the book's summary. The defaults are "
                    "the book's run (tiny BERT, batch 512 x 64, 50 Adam steps at lr 0.01, no "
                    "warmup), except with --corpus sample, the shipped demo, whose defaults are "
                    "the demo's: batch 32 x 64, 200 Adam steps at lr 0.001 after 10 warmup "
                    "steps (at lr 0.01 the tiny encoder collapses: every token gets the same "
                    "vector). Options you set are always used as given.")
    p.add_argument("--backend", help="torch or mxnet (default: $BERTLITE_BACKEND)")
    p.add_argument("--corpus", default="wikitext-2",
                   help="sample (shipped with bertlite), wikitext-2, or a folder")
    p.add_argument("--data-dir", help="folder with wiki.<split>.tokens")
    p.add_argument("--data", help="a folder made by `bertlite prepare`, or a corpus of any size "
                                  "(file, folder or glob) to prepare first")
    p.add_argument("--eval-data", help="held-out prepared folder or corpus (with --data)")
    p.add_argument("--format", choices=list(_FORMATS),
                   help="format of a --data corpus (default: from the extension)")
    p.add_argument("--split", default="train")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--init", help="continue pretraining a local transformers BERT folder (its "
                                  "config, weights and WordPiece tokenizer)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the book's 50; the "
                                             "demo's 200 with --corpus sample)")
    p.add_argument("--batch-size", type=int, help="sentence pairs a step (default: the "
                                                   "book's 512; the demo's 32 with --corpus "
                                                   "sample)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, help="learning rate (default: the book's 0.01; the "
                                            "demo's 0.001 with --corpus sample)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"],
                   help="learning-rate schedule after warmup (default constant)")
    p.add_argument("--warmup-steps", type=int,
                   help="steps of linear warmup (default: the book's 0; the demo's 10 with "
                        "--corpus sample)")
    p.add_argument("--clip-norm", type=float)
    p.add_argument("--masking", default="static", choices=["static", "dynamic"])
    p.add_argument("--tokenizer", default="word", choices=["word", "wordpiece"],
                   help="word: the book's vocabulary (default); wordpiece: train a WordPiece "
                        'vocabulary on the split (the "wordpiece" extra)')
    p.add_argument("--wordpiece-vocab-size", type=int, default=10_000,
                   help="most pieces of a WordPiece vocabulary (default 10000)")
    p.add_argument("--whole-word-mask", action="store_true",
                   help="mask all pieces of a word together")
    p.add_argument("--devices", help='e.g. cpu, cuda, cuda:0,1, cpu:0,cpu:1, gpu:0 '
                                     '(default: all GPUs, else the CPU)')
    p.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="gradient accumulation: run each batch as K micro-batches (default 1)")
    p.add_argument("--precision", default="float32", choices=["float32", "bf16", "fp16"],
                   help="mixed precision: bf16 (CPU or GPU) or fp16 (CUDA); default float32")
    p.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
                   help="on a NaN/infinite loss: stop (default) or skip that update")
    p.add_argument("--dropout", type=float, metavar="P",
                   help="dropout probability in [0, 1) (default: the config's, 0.2 for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="bertlite-loss.png", help="PNG of the loss curves")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--max-time", type=_duration, help="stop after this long (10m, 2h)")
    p.add_argument("--checkpoint-dir", help="save checkpoints here")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="newest checkpoints kept (default 3; 0 keeps all)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--override-resume", action="append", metavar="NAME[,NAME]",
                   help="on --resume, accept this run's value of a setting that differs from "
                        "the checkpoint's (lr, optimizer, weight_decay, schedule, ...); "
                        "recorded in the checkpoint")
    p.add_argument("--save", help="save the final model as a checkpoint folder here")
    p.add_argument("--eval-every", type=int, help="evaluate on --eval-split every N steps")
    p.add_argument("--eval-split", default="valid")
    p.add_argument("--no-progress", action="store_true")

    _add_prepare(sub)

    v = sub.add_parser("evaluate", help="held-out masked-token accuracy, perplexity, NSP "
                                        "accuracy of a checkpoint")
    v.add_argument("--checkpoint", required=True, help="checkpoint folder or directory")
    v.add_argument("--backend", help="backend to run on (default: the one it was trained with)")
    v.add_argument("--corpus", help="sample, wikitext-2 or a folder (default: the corpus it "
                                    "was trained on)")
    v.add_argument("--data-dir")
    v.add_argument("--split", default="valid")
    v.add_argument("--batch-size", type=int, default=128)
    v.add_argument("--max-len", type=int, help="default: the max_len it was trained with")
    v.add_argument("--json", action="store_true")

    e = sub.add_parser("encode", help="print BERT encodings of a text or text pair")
    e.add_argument("text", help="text A (words separated by spaces)")
    e.add_argument("text_b", nargs="?", help="text B of a pair")
    e.add_argument("--checkpoint", required=True, help="checkpoint folder or directory")
    e.add_argument("--backend", help="backend to run on (default: the one it was trained with)")
    e.add_argument("--devices")
    e.add_argument("--dims", type=int, default=3, help="features shown per token (default 3)")

    m = sub.add_parser("plan", help="estimate memory per device for a configuration")
    m.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    m.add_argument("--vocab-size", type=int, default=20000)
    m.add_argument("--batch-size", type=int, default=512)
    m.add_argument("--max-len", type=int, default=64)
    m.add_argument("--precision", default="float32", choices=["float32", "bf16", "fp16"])
    m.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    m.add_argument("--devices", type=int, default=1, help="number of devices sharing the batch")
    m.add_argument("--memory", type=float, help="GiB available per device (default: this "
                                                "machine's RAM)")

    i = sub.add_parser("info", help="versions, backends and devices")
    i.add_argument("--config", choices=sorted(PRESETS),
                   help="also show a preset's size and chance-level losses")
    i.add_argument("--json", action="store_true")

    x = sub.add_parser("export-hf", help="write a checkpoint as a transformers "
                                         "BertForPreTraining folder (BERT flavour only)")
    x.add_argument("--checkpoint", required=True, help="checkpoint folder or directory")
    x.add_argument("--out", required=True, help="new folder for the transformers files")
    h = sub.add_parser("import-hf", help="a local transformers BERT folder as a bertlite "
                                         "checkpoint")
    h.add_argument("folder", help="folder with config.json, model.safetensors, tokenizer")
    h.add_argument("--out", required=True, help="checkpoint folder to write")
    h.add_argument("--backend", help="torch or mxnet (default: $BERTLITE_BACKEND)")

    # parsed by bertlite.launch itself (main() hands it everything after the subcommand)
    sub.add_parser("launch-mxnet", add_help=False,
                   help="run a command as MXNet dist_sync workers on this machine, with a "
                        "scheduler and server(s) (bertlite launch-mxnet --help)")
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    import bertlite

    result = bertlite.train(  # checks every argument, --save and --plot too, before training
        args.backend, corpus=args.corpus, data_dir=args.data_dir, split=args.split,
        config=args.config, batch_size=args.batch_size, max_len=args.max_len,
        num_steps=args.steps, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        clip_norm=args.clip_norm, devices=args.devices, seed=args.seed, masking=args.masking,
        plot=None if args.no_plot else args.plot, progress=not args.no_progress,
        max_time=args.max_time, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, eval_every=args.eval_every, eval_split=args.eval_split,
        tokenizer=args.tokenizer, wordpiece_vocab_size=args.wordpiece_vocab_size,
        whole_word_mask=args.whole_word_mask, accumulate=args.accumulate,
        precision=args.precision, on_nan=args.on_nan, dropout=args.dropout, data=args.data,
        eval_data=args.eval_data, format=args.format, save=args.save,
        override_resume=[name for names in args.override_resume or [] for name in
                         names.split(",") if name.strip()] or None,
        init=args.init)
    if not result.backend.is_main_process():  # torchrun: one process reports and saves
        return 0
    if args.save:
        print(f"saved: {args.save}")
    if not args.no_plot:
        print(f"loss plot: {args.plot}")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("prepare", help="prepare a corpus of any size into a folder of "
                                       "memory-mapped shards (streaming, all cores)")
    r.add_argument("corpus", nargs="*", help="files, folders or glob patterns ('*.jsonl.gz')")
    r.add_argument("--out", help="output folder (default: under the data cache)")
    r.add_argument("--format", choices=list(_FORMATS),
                   help="input format (default: from the extension: .tokens, .jsonl)")
    r.add_argument("--jsonl-field", default="text", help="the text field of jsonl (text)")
    r.add_argument("--skip-bad-lines", action="store_true",
                   help="count and skip jsonl lines that are not JSON or lack the field")
    r.add_argument("--max-len", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--min-freq", type=int, default=5)
    r.add_argument("--tokenizer", default="word", choices=["word", "wordpiece"])
    r.add_argument("--wordpiece-vocab-size", type=int, default=10_000)
    r.add_argument("--wordpiece-sample-mb", type=int, default=256,
                   help="MB of text the WordPiece vocabulary is trained on (default 256)")
    r.add_argument("--whole-word-mask", action="store_true")
    r.add_argument("--vocab-from", help="use the vocabulary of this prepared folder (for a "
                                        "held-out split)")
    r.add_argument("--memory-mb", type=int, default=1024,
                   help="memory budget; sets the text per shard (default 1024)")
    r.add_argument("--shard-mb", type=float,
                   help="text per shard in MB (default: --memory-mb / 48)")
    r.add_argument("--workers", type=int, help="processes (default: the cores)")
    r.add_argument("--part", help="prepare only part i of N ('i/N'); then --merge")
    r.add_argument("--merge", action="store_true",
                   help="write the manifest of a folder whose parts are done (needs --out)")


def _prepare(args: argparse.Namespace) -> int:
    import time

    import bertlite
    from bertlite.data.manifest import read_manifest
    from bertlite.data.prepare import load_folder_vocab, merge

    started = time.perf_counter()
    if args.merge:
        if not args.out:
            raise ValueError("--merge needs --out FOLDER")
        folder = merge(args.out)
    else:
        if not args.corpus:
            raise ValueError("give the corpus: files, folders or glob patterns")
        vocab = load_folder_vocab(_path(args.vocab_from)) if args.vocab_from else None
        folder = bertlite.prepare(
            args.corpus, args.out, format=args.format, max_len=args.max_len, seed=args.seed,
            min_freq=args.min_freq, tokenizer=args.tokenizer,
            wordpiece_vocab_size=args.wordpiece_vocab_size,
            wordpiece_sample_mb=args.wordpiece_sample_mb,
            whole_word_mask=args.whole_word_mask, jsonl_field=args.jsonl_field,
            skip_bad_lines=args.skip_bad_lines, memory_mb=args.memory_mb,
            workers=args.workers, part=args.part, vocab=vocab,
            shard_bytes=None if args.shard_mb is None else int(args.shard_mb * 2**20))
        if args.part:
            print(f"part {args.part} prepared in {folder}; run `bertlite prepare --merge "
                  f"--out {folder}` once every part is done")
            return 0
    manifest = read_manifest(folder, verify=False)
    stats = manifest["stats"]
    mb = sum(i["size"] for i in manifest["inputs"]) / 1e6
    print(f"{folder}: {manifest['examples']} examples in {len(manifest['shards'])} shard(s), "
          f"vocabulary {manifest['vocab']['size']}, from {mb:.1f} MB "
          f"({time.perf_counter() - started:.1f} s)")
    if stats.get("bad_lines"):
        print(f"skipped {stats['bad_lines']} bad line(s), e.g. {stats['bad_examples'][0]}")
    return 0


def _path(text: str):
    from pathlib import Path

    return Path(text)


def _encode(args: argparse.Namespace) -> int:
    import bertlite

    model = bertlite.load(args.checkpoint, backend=args.backend, devices=args.devices)
    tokens_a = model.tokenize(args.text)  # words, or WordPiece pieces
    tokens_b = model.tokenize(args.text_b) if args.text_b else None
    encoded = model.encode(tokens_a, tokens_b)[0]
    tokens, _ = bertlite.get_tokens_and_segments(tokens_a, tokens_b)
    print(f"backend {model.backend.name}; encodings {tuple(encoded.shape)} "
          f"(tokens x hidden); first {args.dims} features")
    for token, vector in zip(tokens, encoded):
        shown = " ".join(f"{x:+.4f}" for x in vector[:args.dims])
        known = "" if token in model.vocab else "  (<unk>)"
        print(f"{token:>12}  {shown}{known}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import bertlite

    metrics = bertlite.evaluate(args.checkpoint, corpus=args.corpus, split=args.split,
                                data_dir=args.data_dir, batch_size=args.batch_size,
                                max_len=args.max_len, backend=args.backend)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.split}: masked-token accuracy {metrics['mlm_accuracy']:.4f}, "
              f"MLM perplexity {metrics['mlm_perplexity']:.2f}, "
              f"NSP accuracy {metrics['nsp_accuracy']:.4f} ({metrics['examples']} examples)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from bertlite import options
    from bertlite.config import BERTConfig
    from bertlite.memory import GIB, estimate_memory

    for name in ("vocab_size", "batch_size", "max_len", "devices"):
        options.positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    options.number("--memory", args.memory, positive=True, optional=True)

    config = BERTConfig.from_preset(args.config, args.vocab_size,
                                    max_len=max(512, args.max_len))
    estimate = estimate_memory(config, args.batch_size, args.max_len, precision=args.precision,
                               optimizer=args.optimizer, num_devices=args.devices)
    print(f"{args.config}: {config.num_parameters() / 1e6:.1f}M parameters, batch "
          f"{args.batch_size} x {args.max_len} over {args.devices} device(s), {args.precision}")
    print(estimate.describe())
    available = args.memory * GIB if args.memory else _physical_memory()
    if available:
        verdict = "fits" if estimate.total <= available else "does NOT fit"
        print(f"{verdict} in {available / GIB:.1f} GiB")
        if estimate.total > available:
            per_example = estimate.activations / args.batch_size
            room = available - (estimate.total - estimate.activations)
            largest = int(room // per_example) if room > 0 else 0
            print(f"largest batch that fits: about {largest} (use gradient accumulation for "
                  "the rest), or bf16, or a shorter max_len")
    return 0


def _physical_memory() -> float | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _info(args: argparse.Namespace) -> int:
    import bertlite

    report = bertlite.info(config=args.config)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"bertlite {report['bertlite']}  python {report['python']}  numpy {report['numpy']}")
    print(f"platform {report['platform']}")
    for name, data in report["backends"].items():
        if data.get("installed"):
            details = ", ".join(f"{k} {v}" for k, v in data.items() if k != "installed")
            print(f"backend {name}: {details}")
        else:
            print(f"backend {name}: not installed ({data.get('install') or data.get('error')})")
    if "config" in report:
        print("config " + ", ".join(f"{k} {v}" for k, v in report["config"].items()))
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from bertlite.hf import export_checkpoint

    print(f"transformers folder: {export_checkpoint(args.checkpoint, args.out)}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from bertlite.hf import from_hf

    model = from_hf(args.folder, backend=args.backend)
    for name in model.metadata["initialised"]:
        print(f"initialised (not in the folder): {name}")
    model.save(args.out)
    print(f"checkpoint: {args.out} ({model.metadata['imported_from']})")
    return 0


def _for_cli(err: Exception, args: argparse.Namespace) -> str:
    """The error in a CLI user's words: ``--backend`` where the API's words say ``backend=``,
    and, where a checkpoint's framework is missing, the installed one that can run it."""
    from bertlite.registry import ENV_VAR, FrameworkMissingError, NoBackendError, installed_backends

    installed = installed_backends()
    choices = "{" + ",".join(installed) + "}"
    if isinstance(err, NoBackendError):
        if not installed:
            from bertlite.install import install_command

            return (f"no backend installed: {install_command('torch')} (or mxnet), then pass "
                    f"--backend or set {ENV_VAR}")
        return f"no backend chosen: pass --backend {choices} (installed here) or set {ENV_VAR}"
    if (isinstance(err, FrameworkMissingError) and args.command in ("evaluate", "encode")
            and not getattr(args, "backend", None) and installed):
        return (f"{err}; or run the checkpoint on an installed framework (either reads what "
                f"either wrote): --backend {installed[0] if len(installed) == 1 else choices}")
    return str(err)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch-mxnet"]:  # its own parser: everything after -- is the command
        from bertlite.launch import main as launch_main

        return launch_main(argv[1:], prog="bertlite launch-mxnet")
    parser = build_parser()
    args = parser.parse_args(argv)
    from bertlite.api import OutputError
    from bertlite.errors import BertliteError
    from bertlite.signals import TrainingInterrupted

    try:
        status_line(args)
        return {"pretrain": _pretrain, "prepare": _prepare, "encode": _encode,
                "evaluate": _evaluate, "plan": _plan, "info": _info, "export-hf": _export_hf,
                "import-hf": _import_hf}[args.command](args)
    except OutputError as err:  # trained, but an output failed: not a usage error
        print(f"bertlite {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (BertliteError, ValueError, ImportError, FloatingPointError, MemoryError) as err:
        print(f"bertlite {args.command}: error: {_for_cli(err, args)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:  # the line naming the checkpoint is already printed
        return stop.exit_code
    except KeyboardInterrupt:
        print("bertlite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
