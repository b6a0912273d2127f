"""Every benchmark with short defaults, and their tables: one command, well under 10 minutes.

    python benchmarks/run_all.py [--full | --quick] [--only step,run,scaling,data]

Runs, each measurement in subprocesses of its own:

1. ``bench_step``: one training step, bertlite against the book, torch (with the malloc-advice
   rows) and mxnet (hybridized and imperative), 8 rounds;
2. ``bench_run``: the whole run per backend against the book's ``train_bert`` loop (20 steps
   by default: the book's MXNet run alone takes 2 to 5 minutes for 50 steps here; ``--full``
   runs the book's 50), and ``bertlite pretrain --corpus sample`` with its defaults, 50 steps
   (target < 60 s);
3. ``bench_scaling``: pairs/s and memory as the batch and max_len grow, the base config, and
   the memory estimate against the measured peak (fewer points unless ``--full``);
4. ``bench_data``: data preparation against the book's (after a first call, one run of the
   book's and three of bertlite's unless ``--full``).

About 6 minutes on this machine when it is otherwise idle (``--full``: about 12).

Every table names the machine it was measured on (CPU, cores, threads, versions, load). This
machine is shared: each benchmark interleaves or repeats its measurements, and ``--repeat``
re-runs the step benchmark to show how stable its ratios are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402
import bench_run  # noqa: E402
import bench_scaling  # noqa: E402
import bench_step  # noqa: E402

SECTIONS = ("step", "run", "scaling", "data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer step rounds, torch only for the whole runs (about 3 min)")
    parser.add_argument("--full", action="store_true",
                        help="the book's 50 steps in the whole runs, every scaling point")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the step benchmark this many times (default 1)")
    parser.add_argument("--data-dir", type=Path, default=M.DEFAULT_DATA_DIR)
    parser.add_argument("--json-dir", type=Path, help="write every section's raw results here")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if not (args.data_dir / "wiki.valid.tokens").is_file():
        sys.exit(f"WikiText-2 not found: {args.data_dir} has no wiki.valid.tokens "
                 "(use --data-dir)")
    if args.json_dir:
        args.json_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = M.describe(2)
    print(f"bertlite benchmarks; machine: {M.machine_line(info)}")
    texts, summary = [], []

    def save(name: str, result: object) -> None:
        if args.json_dir:
            (args.json_dir / f"{name}.json").write_text(json.dumps(result, indent=1))

    if "step" in sections:
        ns = argparse.Namespace(data_dir=args.data_dir, repeats=5 if args.quick else 8,
                                warmup=2, threads=2, batch_size=512, max_len=64,
                                malloc_advice=not args.quick, flavors=False, against=[],
                                against_paths=[], corpus="wikitext-2")
        for attempt in range(args.repeat):
            results = []
            for backend in bench_step.BACKENDS:
                print(f"  step: {backend} ...", file=sys.stderr, flush=True)
                results.append(bench_step.measure(backend, ns))
            texts.append(bench_step.report(results))
            save(f"step-{attempt + 1}", results)
            torch_res = results[0]
            book = torch_res["results"]["book"]["median"]
            ours = torch_res["results"]["bertlite"]["median"]
            frac = torch_res["flops"] / ours / 1e9 / torch_res["peak_gflops"]
            summary.append(f"step (torch, run {attempt + 1}): bertlite {ours:.3f} s vs book "
                           f"{book:.3f} s = {book / ours:.2f}x (target 2x: "
                           f"{M.check(book / ours >= 2)}); {100 * frac:.0f}% of the "
                           f"{torch_res['peak_gflops']:.0f} GFLOP/s matmul peak (target 60%: "
                           f"{M.check(frac >= 0.6)})")
            mx = results[1]["results"]
            hybrid = mx["bertlite"]["median"]
            summary.append(f"step (mxnet, run {attempt + 1}): bertlite "
                           f"{mx['book']['median'] / hybrid:.2f}x the book; hybridized "
                           f"{mx['bertlite imperative']['median'] / hybrid:.2f}x imperative")

    if "run" in sections:
        ns = argparse.Namespace(backend="torch" if args.quick else "all",
                                data_dir=args.data_dir, steps=50 if args.full else 20,
                                threads=2, sample=True, sample_warm=args.full, timeout=900)
        res = bench_run.measure(ns)
        texts.append(bench_run.report(res))
        save("run", res)
        for s in res["sample"]:
            summary.append(f"bertlite pretrain --corpus sample ({s['backend']}, "
                           f"{s['cache']} cache): {s['wall_s']:.1f} s (target < 60 s: "
                           f"{M.check(s['wall_s'] < 60)})")
        by = {(r["kind"], r["backend"]): r for r in res["runs"]}
        for backend in bench_run.BACKENDS:
            if ("book", backend) in by:
                b, o = by[("book", backend)], by[("bertlite", backend)]
                summary.append(f"{ns.steps}-step run ({backend}): bertlite {o['wall_s']:.1f} s vs "
                               f"book {b['wall_s']:.1f} s ({b['wall_s'] / o['wall_s']:.2f}x); peak "
                               f"PSS {o['tree_pss_mb']:.0f} vs {b['tree_pss_mb']:.0f} MB")

    if "scaling" in sections:
        ns = argparse.Namespace(backend="torch", data_dir=args.data_dir,
                                steps=3 if args.quick else 4, warmup=2, threads=2,
                                quick=not args.full, timeout=600)
        res = bench_scaling.measure(ns)
        texts.append(bench_scaling.report(res))
        save("scaling", res)

    if "data" in sections:
        import bench_data

        print(f"\nmachine: {M.machine_line(M.describe())}")
        bench_data.main(["--data-dir", str(args.data_dir)] +
                        ([] if args.full else
                         ["--book-runs", "1", "--uncached-runs", "3", "--cached-runs", "3"]))

    print(f"\nSummary ({(time.perf_counter() - started) / 60:.1f} min; machine: "
          f"{M.machine_line(info)})")
    for line in summary:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
