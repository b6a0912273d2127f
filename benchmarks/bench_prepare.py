"""``bertlite prepare`` against the in-memory pipeline, on a WikiText-like corpus of N MB.

    nice -n 10 python benchmarks/bench_prepare.py [--mb 100] [--corpus FILE] [--workers 1 2]
        [--memory-path-mb 100]

Makes the corpus with ``make_corpus.py`` (unless ``--corpus`` is given), then runs, each in a
fresh subprocess and in this order: the in-memory path (``prepare_data(path, cache=False)``,
today's ``load_data_wiki``) and ``bertlite.prepare`` (word vocabulary, min_freq 5, max_len 64;
``--tokenizer wordpiece`` for WordPiece in both) with each number of workers. Reports the wall
time, MB/s of input end to end and the peak proportional set size (PSS) of the whole process
tree (workers included), with the ratios to the in-memory path measured in the same run.
Targets (issue 17): >= 10 MB/s end to end and < 1 GB peak RSS of the tree. For a corpus
too big for the in-memory path (it needs ~13x the corpus in RAM), ``--memory-path-mb N`` runs it
on the corpus's first N MB instead, as the reference measured under the same load (compare
MB/s). Each run reports the 1-minute load average at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402


def _worker(args: argparse.Namespace) -> None:
    path = Path(args.path)
    start = time.perf_counter()
    if args.worker == "memory":
        from bertlite.data.loader import prepare_data

        examples, vocab = prepare_data(path, args.max_len, cache=False,
                                       tokenizer=args.tokenizer)
        result = {"examples": len(examples), "vocab": len(vocab)}
    else:
        from bertlite.data.manifest import read_manifest
        from bertlite.data.prepare import prepare

        folder = prepare(path, args.out, max_len=args.max_len, workers=args.workers[0],
                         memory_mb=args.memory_mb, tokenizer=args.tokenizer)
        manifest = read_manifest(folder, verify=False)
        result = {"examples": manifest["examples"], "vocab": manifest["vocab"]["size"],
                  "shards": len(manifest["shards"])}
    result["seconds"] = time.perf_counter() - start
    result["load_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--corpus", help="an existing WikiText-format file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--tokenizer", default="word", choices=["word", "wordpiece"],
                        help="wordpiece: 10,000 pieces trained on the text (both paths)")
    parser.add_argument("--skip-memory-path", action="store_true",
                        help="leave out the in-memory path (it needs ~13x the corpus in RAM)")
    parser.add_argument("--memory-path-mb", type=float,
                        help="run the in-memory path on the corpus's first N MB only")
    parser.add_argument("--keep", help="prepare into this folder and keep it (e.g. for "
                        "bench_train_prepared.py); one number of workers only")
    parser.add_argument("--worker", choices=["memory", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    M.print_machine(M.describe())
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        if args.corpus:
            corpus = Path(args.corpus)
        else:
            from make_corpus import make_corpus

            corpus = make_corpus(tmp / "corpus.tokens", args.mb)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus {corpus} ({mb:.1f} MB)")
        common = ["--path", str(corpus), "--max-len", str(args.max_len), "--tokenizer",
                  args.tokenizer]
        runs = [] if args.skip_memory_path else [("in-memory (prepare_data)", ["--worker",
                                                                             "memory"])]
        sizes = {}
        if args.memory_path_mb and not args.skip_memory_path:
            head = tmp / "head.tokens"
            with open(corpus, "rb") as src, open(head, "wb") as dst:
                piece = src.read(int(args.memory_path_mb * 1e6))
                dst.write(piece[:piece.rfind(b"\n") + 1])
            runs = [(runs[0][0], ["--worker", "memory", "--path", str(head)])]
            sizes[runs[0][0]] = head.stat().st_size / 1e6
        for n in args.workers:
            runs.append((f"prepare, {n} worker(s)",
                         ["--worker", "prepare", "--workers", str(n), "--out",
                          args.keep or str(tmp / f"out-{n}"), "--memory-mb",
                          str(args.memory_mb)]))
        rows, results = [], {}
        for name, extra in runs:
            res = M.run_worker(Path(__file__), [*common, *extra])
            results[name] = res
            print(f"{name}: {json.dumps(res)}", flush=True)
        base = results.get("in-memory (prepare_data)")
        base_speed = base and sizes.get("in-memory (prepare_data)", mb) / base["wall_s"]
        for name, res in results.items():
            wall, size = res["wall_s"], sizes.get(name, mb)
            rows.append([name, f"{size:.0f}", f"{wall:.1f}", f"{size / wall:.1f}",
                         f"{res['tree_pss_mb']:.0f}", res["examples"], res["vocab"],
                         f"{size / wall / base_speed:.2f}x" if base else "",
                         f"{res['tree_pss_mb'] / base['tree_pss_mb']:.2f}x" if base else "",
                         res["load_at_end"]])
        print(M.table(["path", "MB", "wall s", "MB/s", "peak tree PSS MB", "examples", "vocab",
                       "speed vs in-memory", "memory vs in-memory", "load at end"], rows))
        for name, res in results.items():
            if name.startswith("prepare"):
                print(f"{name}: >= 10 MB/s {M.check(mb / res['wall_s'] >= 10)}, peak tree < 1 GB "
                      f"{M.check(res['tree_pss_mb'] < 1024)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
