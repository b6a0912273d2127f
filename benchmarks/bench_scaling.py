"""How bertlite's training speed and memory grow with the batch and the sequence length.

    python benchmarks/bench_scaling.py [--backend torch|mxnet|all] [--steps 4] [--quick]

Every point is a subprocess of its own, training on WikiText-2's validation split
(``bertlite.data.load_data_wiki(batch, max_len, split="valid")``, successive batches):

* batch size 64, 128, 256, 512 at max_len 64 (tiny config);
* max_len 64, 128, 256, 512 at batch 64 (tiny config);
* the ``base`` config (768 hidden, 12 layers, 12 heads, 3072 FFN) at batch 8 x 128.

Reported: the median step time over the timed steps (after warm-up), pairs/s and tokens/s,
the process's peak RSS, and the training memory measured as the growth of the peak RSS from
just before the model is built (the data already loaded) to the end, next to
``bertlite.estimate_memory(config, batch, max_len)`` (parameters, gradients, Adam state and
the activations of a padded batch) and their ratio. The torch backend trains padded batches
packed (valid tokens only), so it needs less than the padded estimate; the measured figure also
carries the allocator's slack (glibc keeps freed memory for reuse).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

BACKENDS = ("torch", "mxnet")
BATCHES = (64, 128, 256, 512)
LENGTHS = (64, 128, 256, 512)


def points(quick: bool) -> list[tuple[str, str, int, int]]:
    """``(sweep, config, batch, max_len)`` of every measurement."""
    batches = (64, 512) if quick else BATCHES
    lengths = (128, 512) if quick else LENGTHS
    pts = [("batch", "tiny", b, 64) for b in batches]
    pts += [("max_len", "tiny", 64, n) for n in lengths if not (n == 64 and 64 in batches)]
    pts.append(("base config", "base", 8, 128))
    return pts


# ----------------------------------------------------------------------------- worker side


def worker(args) -> dict:
    if args.backend == "mxnet":
        import mxnet  # noqa: F401
    from bertlite.config import BERTConfig
    from bertlite.data import load_data_wiki
    from bertlite.memory import estimate_memory
    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params
    from bertlite.registry import get_backend

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    batches, vocab = load_data_wiki(args.batch_size, args.max_len, data_dir=args.data_dir,
                                    split="valid")
    stream = batches.stream()
    data = [next(stream)[2] for _ in range(args.warmup + args.steps)]
    config = BERTConfig.from_preset(args.config, len(vocab))
    base_rss = M.rss_mb()
    reset = M.reset_peak_rss()
    be = get_backend(args.backend)
    net = be.build_model(config, be.parse_devices("cpu"))
    be.load_state_dict(net, init_params(config, 0))
    opt = be.create_optimizer(net, OptimizerSettings(lr=1e-4))
    times = []
    for i, batch in enumerate(data):
        be.seed(i)
        start = time.perf_counter()
        mlm, _ = be.train_step(net, opt, batch, 1e-4)
        float(mlm)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = M.peak_rss_mb()
    estimate = estimate_memory(config, args.batch_size, args.max_len)
    return {"step_s": statistics.median(times), "times": times, "peak_rss_mb": peak,
            "base_rss_mb": base_rss, "measured_mb": peak - base_rss if reset else None,
            "estimate_mb": estimate.total / 2**20, "estimate": estimate.to_dict(),
            "parameters": config.num_parameters(),
            "valid_tokens": float(sum(float(b.valid_lens.sum()) for b in data)) / len(data)}


# ----------------------------------------------------------------------------- driver side


def measure(args) -> dict:
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    rows = []
    for backend in backends:
        for sweep, config, batch, length in points(args.quick):
            print(f"  scaling: {backend} {config} {batch} x {length} ...", file=sys.stderr,
                  flush=True)
            steps = max(2, args.steps // 2) if config == "base" else args.steps
            cmd = ["--worker", "--backend", backend, "--config", config, "--batch-size",
                   str(batch), "--max-len", str(length), "--steps", str(steps), "--warmup",
                   str(1 if config == "base" else args.warmup), "--threads",
                   str(args.threads), "--data-dir", str(args.data_dir)]
            try:
                res = M.run_worker(Path(__file__).resolve(), cmd,
                                   env={"OMP_NUM_THREADS": str(args.threads)},
                                   timeout=args.timeout)
            except RuntimeError as err:
                res = {"error": str(err).splitlines()[-1]}
            rows.append({"backend": backend, "sweep": sweep, "config": config, "batch": batch,
                         "max_len": length, **res})
    return {"rows": rows, "machine": M.describe(args.threads)}


def report(res: dict, file=None) -> str:
    out = ["\nScaling: bertlite training steps on WikiText-2 valid (median step after warm-up; "
           "each point a process of its own)", f"machine: {M.machine_line(res['machine'])}"]
    rows = []
    for r in res["rows"]:
        head = [r["backend"], r["sweep"], r["config"], f"{r['batch']} x {r['max_len']}"]
        if "error" in r:
            rows.append(head + [r["error"][:60]] + [""] * 7)
            continue
        t = r["step_s"]
        measured = r["measured_mb"]
        rows.append(head + [f"{t:.3f}", f"{r['batch'] / t:.0f}",
                            f"{r['valid_tokens'] / t:.0f}", f"{r['peak_rss_mb']:.0f}",
                            f"{measured:.0f}" if measured is not None else "-",
                            f"{r['estimate_mb']:.0f}",
                            f"{measured / r['estimate_mb']:.2f}" if measured is not None
                            else "-"])
    out.append(M.table(["backend", "sweep", "config", "batch x len", "s/step", "pairs/s",
                        "valid tok/s", "peak RSS MB", "training MB", "estimate MB",
                        "measured/est."], rows))
    out.append("training MB: peak RSS growth from just before the model is built; estimate: "
               "bertlite.estimate_memory (float32, Adam, padded activations)")
    text = "\n".join(out)
    print(text, file=file or sys.stdout)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="torch")
    parser.add_argument("--data-dir", type=Path, default=M.DEFAULT_DATA_DIR)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--max-len", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    res = measure(args)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
