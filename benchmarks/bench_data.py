"""Data preparation: the book's code (d2l 0.17.6) against bertlite, on the same real text.

    python benchmarks/bench_data.py [--data-dir DIR] [--max-len 64]

For each input (WikiText-2's validation split, and validation + test concatenated) it measures,
each in a subprocess of its own:

* the book: ``d2l.torch._read_wiki`` + ``d2l.torch._WikiTextDataset(paragraphs, max_len)``,
  median of 3 runs;
* bertlite uncached: ``prepare_data(path, max_len, cache=False)``, median of 5 runs;
* bertlite cached: ``prepare_data(path, max_len)`` after one call that writes the cache,
  median of 5 loads;

each after one more call, the process's first (cold: memory not yet mapped, code not yet
run), whose time is shown apart ("first s");

and the memory of one more run of each in a fresh process: the growth of the peak RSS during
that run (the peak is reset first where Linux allows it) and the tracemalloc peak (Python
objects and numpy arrays; torch's allocator is not traced). Targets: uncached >= 10x faster
than the book; a cached load < 0.5 s and >= 50x faster than the book's preparation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

IMPLS = ("book", "uncached", "cached")


# ----------------------------------------------------------------------------- worker side


def _make_runner(impl: str, folder: Path, max_len: int, cache_dir: Path):
    """A function running one preparation and returning (examples, vocabulary size)."""
    path = folder / "wiki.train.tokens"
    if impl == "book":
        from _reference import import_d2l

        d2l = import_d2l("torch")

        def run(i: int):
            random.seed(i)
            paragraphs = d2l._read_wiki(str(folder))
            dataset = d2l._WikiTextDataset(paragraphs, max_len)
            return len(dataset), len(dataset.vocab)
    else:
        from bertlite.data import prepare_data

        use_cache = impl == "cached"

        def run(i: int):
            examples, vocab = prepare_data(path, max_len, cache=use_cache, cache_dir=cache_dir)
            return len(examples), len(vocab)

        if use_cache:
            run(-1)  # the warm-up write; the loads below are hits
    return run


def worker(impl: str, folder: Path, max_len: int, cache_dir: Path, runs: int,
           memory: bool) -> dict:
    run = _make_runner(impl, folder, max_len, cache_dir)
    if memory:
        rss_before = M.rss_mb()
        reset = M.reset_peak_rss()
        hwm_before = M.peak_rss_mb() if reset else rss_before
        num_examples, vocab_size = run(0)
        rss_peak = M.peak_rss_mb()
        tracemalloc.start()
        run(1)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"peak_rss_growth_mb": max(0, rss_peak - hwm_before),
                "peak_rss_mb": rss_peak, "peak_reset": reset,
                "traced_peak_mb": traced_peak / 2**20,
                "num_examples": num_examples, "vocab_size": vocab_size}
    start = time.perf_counter()
    run(runs)  # the process's first call (cold): reported, not in the median
    first = time.perf_counter() - start
    times = []
    for i in range(runs):
        start = time.perf_counter()
        num_examples, vocab_size = run(i)
        times.append(time.perf_counter() - start)
    return {"times": times, "first": first, "num_examples": num_examples,
            "vocab_size": vocab_size}


# ----------------------------------------------------------------------------- driver side


def measure(impl: str, folder: Path, max_len: int, cache_dir: Path, runs: int,
            memory: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl,
           "--folder", str(folder), "--max-len", str(max_len), "--cache-dir", str(cache_dir),
           "--runs", str(runs)] + (["--memory"] if memory else [])
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"the {impl} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_inputs(data_dir: Path, work: Path) -> dict[str, Path]:
    """Folders whose wiki.train.tokens is the text to prepare (the book reads only that)."""
    valid = (data_dir / "wiki.valid.tokens").read_bytes()
    test = (data_dir / "wiki.test.tokens").read_bytes()
    inputs = {}
    for name, text in (("valid", valid), ("valid+test", valid + test)):
        folder = work / name.replace("+", "_")
        folder.mkdir()
        (folder / "wiki.train.tokens").write_bytes(text)
        inputs[name] = folder
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=M.DEFAULT_DATA_DIR,
                        help="folder with WikiText-2's wiki.valid.tokens and wiki.test.tokens "
                             f"(default: {M.DEFAULT_DATA_DIR})")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--book-runs", type=int, default=3)
    parser.add_argument("--uncached-runs", type=int, default=5)
    parser.add_argument("--cached-runs", type=int, default=5)
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = worker(args.worker, args.folder, args.max_len, args.cache_dir, args.runs,
                        args.memory)
        print(json.dumps(result))
        return 0

    missing = [f"wiki.{s}.tokens" for s in ("valid", "test")
               if not (args.data_dir / f"wiki.{s}.tokens").is_file()]
    if missing:
        sys.exit(f"WikiText-2 not found: {args.data_dir} lacks {', '.join(missing)}. Point "
                 "--data-dir at the folder of the real wiki.valid.tokens and wiki.test.tokens "
                 "(the book's wikitext-2-v1.zip, extracted).")
    from _reference import ReferenceUnavailable, import_d2l

    try:  # fail early, before any timing, if the reference cannot be imported
        import_d2l("torch")
    except ReferenceUnavailable as err:
        sys.exit(f"cannot run the book's code: {err}")

    runs = {"book": args.book_runs, "uncached": args.uncached_runs, "cached": args.cached_runs}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        inputs = prepare_inputs(args.data_dir, Path(tmp))
        for name, folder in inputs.items():
            cache_dir = Path(tmp) / f"cache-{folder.name}"
            size_mb = (folder / "wiki.train.tokens").stat().st_size / 2**20
            results = {}
            for impl in IMPLS:
                print(f"  {name}: {impl} ...", file=sys.stderr, flush=True)
                timing = measure(impl, folder, args.max_len, cache_dir, runs[impl])
                memory = measure(impl, folder, args.max_len, cache_dir, 1, memory=True)
                results[impl] = {**timing, **memory,
                                 "median": statistics.median(timing["times"])}
            rows.append((name, size_mb, results))

    print_table(rows, args.max_len, runs)
    return 0


def print_table(rows, max_len: int, runs: dict[str, int]) -> None:
    import platform

    import numpy as np

    labels = {"book": f"d2l 0.17.6 (median of {runs['book']})",
              "uncached": f"bertlite uncached (median of {runs['uncached']})",
              "cached": f"bertlite cached load (median of {runs['cached']})"}
    print(f"\nData preparation, max_len {max_len}; Python {platform.python_version()}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs\n")
    header = (f"{'input':<11} {'MB':>4}  {'implementation':<36} {'time s':>7} {'min s':>7} "
              f"{'vs book':>8} {'first s':>7} {'vs book':>8} {'peak RSS +MB':>12} "
              f"{'traced MB':>10} {'examples':>9} {'vocab':>6}")
    print(header)
    print("-" * len(header))
    for name, size_mb, results in rows:
        book = results["book"]["median"]
        for impl in IMPLS:
            r = results[impl]
            first = impl == "book"
            print(f"{name if first else '':<11} {f'{size_mb:.1f}' if first else '':>4}  "
                  f"{labels[impl]:<36} {r['median']:>7.3f} {min(r['times']):>7.3f} "
                  f"{book / r['median']:>7.1f}x {r['first']:>7.3f} "
                  f"{results['book']['first'] / r['first']:>7.1f}x "
                  f"{r['peak_rss_growth_mb']:>12.1f} "
                  f"{r['traced_peak_mb']:>10.1f} {r['num_examples']:>9,} {r['vocab_size']:>6,}")
        print()
    print("targets:")
    for name, _, results in rows:
        book = results["book"]["median"]
        uncached, cached = results["uncached"]["median"], results["cached"]["median"]
        print(f"  {name:<11} uncached >= 10x faster than the book: {book / uncached:6.1f}x "
              f"{M.check(book / uncached >= 10)}; cached < 0.5 s: {cached:.3f} s "
              f"{M.check(cached < 0.5)}; cached >= 50x faster than the book: "
              f"{book / cached:6.1f}x {M.check(book / cached >= 50)}")
    resets = {r["peak_reset"] for _, _, res in rows for r in res.values()}
    note = ("reset before the run" if resets == {True}
            else "NOT resettable here: the growth may hide under the import peak")
    print("\ntime s: median of the runs after the process's first call; first s: that first "
          "call (cold), with its ratio to the book's first call.")
    print("peak RSS +MB: growth of the process's peak RSS during one preparation (peak "
          f"{note}); traced MB: tracemalloc peak of another run (Python objects and numpy "
          "arrays; torch tensors are not traced). Each measurement runs in its own process.")


if __name__ == "__main__":
    sys.exit(main())
