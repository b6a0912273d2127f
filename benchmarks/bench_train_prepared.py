"""Training from a prepared folder (memory-mapped shards) against the in-memory path.

    nice -n 10 python benchmarks/bench_train_prepared.py FOLDER [--memory-corpus FILE]
        [--steps 100] [--batch-size 64] [--backend torch] [--num-hiddens 128]

Runs, each in a fresh subprocess, alternately (``--rounds``, default 2, so both see the same
machine load): ``train_bert`` on the batches of FOLDER (:class:`PreparedBatches`) and on the
in-memory batches of a WikiText-format file (default: WikiText-2's validation split, from
``/work/shared/data/wikitext-2``), with the same model (the ``tiny`` preset with the folder's
vocabulary size in both, so that only the data path differs; ``--num-hiddens`` narrows it, since
with a big folder's vocabulary the output layer dominates the step), batch, seed and steps.
Reports steps/s from step 10 to the last (data loading included) and the RSS at the last step.
Targets (issue 17): RSS within 300 MB of the in-memory path, steps/s within 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

WIKITEXT_VALID = Path("/work/shared/data/wikitext-2/wiki.valid.tokens")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(args: argparse.Namespace) -> None:
    from bertlite.config import resolve_config
    from bertlite.data.loader import BatchIterator, prepare_data
    from bertlite.data.prepared import PreparedBatches, PreparedData
    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params
    from bertlite.registry import get_backend
    from bertlite.trainer import train_bert

    folder = PreparedData(args.folder, verify=False)
    vocab_size = len(folder.vocab)
    if args.worker == "prepared":
        batches = PreparedBatches(folder, args.batch_size, seed=0)
    else:
        del folder
        examples, vocab = prepare_data(args.memory_corpus, 64, cache=False)
        batches = BatchIterator(examples, args.batch_size, seed=0, vocab_size=len(vocab),
                                mask_id=vocab["<mask>"])
    if args.data_only:  # the data path alone: batches 0..steps-1 of pass 0, no model
        batches.order(0)  # the pass's order, drawn once a pass (not per batch)
        start = time.perf_counter()
        for _, _ in zip(range(args.steps), batches.stream(0, 0)):
            pass
        print(json.dumps({"ms_per_batch": 1000 * (time.perf_counter() - start) / args.steps,
                          "rss_mb_at_last_step": _rss_mb(), "vocab": vocab_size,
                          "examples": batches.num_examples,
                          "load": os.getloadavg()[0]}))
        return
    be = get_backend(args.backend)
    config = resolve_config("tiny", vocab_size, max_len=64).replace(
        num_hiddens=args.num_hiddens, ffn_num_hiddens=2 * args.num_hiddens)
    model = be.build_model(config, be.parse_devices(None))
    be.load_state_dict(model, init_params(config, 0))
    settings = OptimizerSettings(lr=1e-4)
    times: list[float] = []
    rss: list[float] = []

    def note(state) -> None:
        times.append(time.perf_counter())
        if state.step == args.steps:
            rss.append(_rss_mb())

    # what a step's cost depends on besides the model: predicted tokens and valid tokens
    sample = [batches.batch(0, i) for i in range(min(20, len(batches)))]
    mlm_tokens = float(np.mean([b.mlm_weights.sum() for b in sample]))
    valid_tokens = float(np.mean([b.valid_lens.sum() for b in sample]))
    train_bert(batches, be, model, be.create_optimizer(model, settings), settings, args.steps,
               progress=False, callbacks=[note])
    steady = times[9:]
    print(json.dumps({"steps_per_s": (len(steady) - 1) / (steady[-1] - steady[0]),
                      "rss_mb_at_last_step": rss[0], "vocab": vocab_size,
                      "mlm_tokens_per_batch": mlm_tokens, "valid_tokens_per_batch": valid_tokens,
                      "examples": batches.num_examples if hasattr(batches, "num_examples")
                      else len(batches.examples), "load": os.getloadavg()[0]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--memory-corpus", default=str(WIKITEXT_VALID))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--num-hiddens", type=int, default=128,
                        help="the model's width (tiny: 128; FFN twice that)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-only", action="store_true",
                        help="time only the batches (no model): ms per batch and RSS per path")
    parser.add_argument("--worker", choices=["prepared", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if not Path(args.memory_corpus).is_file():
        print(f"skipped: {args.memory_corpus} is absent (WikiText-2 validation split)")
        return 0
    M.print_machine(M.describe())
    common = [args.folder, "--memory-corpus", args.memory_corpus, "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--backend", args.backend,
              "--num-hiddens", str(args.num_hiddens), *(["--data-only"] if args.data_only else [])]
    results: dict[str, list[dict]] = {"memory": [], "prepared": []}
    for _ in range(args.rounds):
        for name in ("memory", "prepared"):
            res = M.run_worker(Path(__file__), [*common, "--worker", name], sample_interval=0.5)
            results[name].append(res)
            print(f"{name}: {json.dumps(res)}", flush=True)
    if args.data_only:
        best = {name: min(runs, key=lambda r: r["ms_per_batch"]) for name, runs in results.items()}
        print(M.table(["data", "ms per batch (best round)", f"RSS MB after {args.steps} batches",
                       "examples"],
                      [[name, f"{r['ms_per_batch']:.2f}", f"{r['rss_mb_at_last_step']:.0f}",
                        r["examples"]] for name, r in best.items()]))
        return 0
    best = {name: max(runs, key=lambda r: r["steps_per_s"]) for name, runs in results.items()}
    rows = [[name, f"{r['steps_per_s']:.3f}", f"{r['rss_mb_at_last_step']:.0f}",
             f"{r['tree_pss_mb']:.0f}", r["examples"]] for name, r in best.items()]
    print(M.table(["data", "steps/s (best round)", f"RSS MB at step {args.steps}",
                   "peak tree PSS MB", "examples"], rows))
    mem, prep = best["memory"], best["prepared"]
    print(f"RSS difference {prep['rss_mb_at_last_step'] - mem['rss_mb_at_last_step']:+.0f} MB "
          f"(target within 300) "
          f"{M.check(abs(prep['rss_mb_at_last_step'] - mem['rss_mb_at_last_step']) <= 300)}; "
          f"steps/s ratio {prep['steps_per_s'] / mem['steps_per_s']:.3f} (target >= 0.95) "
          f"{M.check(prep['steps_per_s'] / mem['steps_per_s'] >= 0.95)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
