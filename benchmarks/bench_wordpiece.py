"""``bertlite prepare --tokenizer wordpiece`` against the pipeline a user would otherwise write
with Hugging Face ``datasets``: ``load_dataset("text")`` + ``map(batched=True, num_proc=2)``
with the same trained fast tokenizer (the prepared folder's ``tokenizer.json``).

    nice -n 10 python benchmarks/bench_wordpiece.py CORPUS --datasets-python /path/venv/bin/python
        [--mb 20] [--workers 2]

``datasets`` is not a bertlite dependency: give the Python of a venv that has ``datasets`` and
``tokenizers`` (``python3 -m venv ds && ds/bin/pip install datasets tokenizers``). Both run in
fresh subprocesses on the corpus's first ``--mb`` MB, one after the other (alternating over
``--rounds``): bertlite end to end (WordPiece training, encoding, NSP pairs, masks, shards) and
``datasets`` tokenizing only (its cache in a temporary folder, written as it does by default).
Reports MB/s and the peak PSS of each process tree. Target (issue 17): bertlite >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

HF_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import datasets
from tokenizers import Tokenizer

path, tokenizer_file, cache = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = Tokenizer.from_file(tokenizer_file)

def encode(batch):
    return {"input_ids": [e.ids for e in tokenizer.encode_batch(batch["text"])]}

data = datasets.load_dataset("text", data_files=path, split="train", cache_dir=cache)
data = data.map(encode, batched=True, num_proc=2, remove_columns=["text"])
tokens = sum(len(ids) for ids in data.with_format("numpy")["input_ids"])
print(json.dumps({"rows": len(data), "tokens": int(tokens),
                  "seconds": time.perf_counter() - start}))
"""


def _worker(args: argparse.Namespace) -> None:
    from bertlite.data.manifest import read_manifest
    from bertlite.data.prepare import prepare

    start = time.perf_counter()
    folder = prepare(args.path, args.out, tokenizer="wordpiece", wordpiece_vocab_size=10_000,
                     workers=args.workers)
    manifest = read_manifest(folder, verify=False)
    print(json.dumps({"examples": manifest["examples"], "vocab": manifest["vocab"]["size"],
                      "seconds": time.perf_counter() - start}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="?")
    parser.add_argument("--datasets-python")
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if not args.corpus or not args.datasets_python:
        parser.error("give CORPUS and --datasets-python")
    M.print_machine(M.describe())
    tmp = Path(tempfile.mkdtemp(prefix="bench-wordpiece-"))
    try:
        head = tmp / "head.tokens"
        with open(args.corpus, "rb") as src, open(head, "wb") as dst:
            piece = src.read(int(args.mb * 1e6))
            dst.write(piece[:piece.rfind(b"\n") + 1])
        mb = head.stat().st_size / 1e6
        script = tmp / "hf.py"
        script.write_text(HF_SCRIPT)
        results: dict[str, list[dict]] = {"bertlite prepare": [], "datasets map": []}
        for r in range(args.rounds):
            out = tmp / f"out-{r}"
            res = M.run_worker(Path(__file__), ["--worker", "--path", str(head), "--out",
                                                str(out), "--workers", str(args.workers)])
            results["bertlite prepare"].append(res)
            print(f"bertlite prepare: {json.dumps(res)}", flush=True)
            res = _run_hf(args.datasets_python, script, head, out / "tokenizer.json",
                          tmp / f"hf-cache-{r}")
            results["datasets map"].append(res)
            print(f"datasets map: {json.dumps(res)}", flush=True)
        best = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in results.items()}
        rows = [[name, f"{r['wall_s']:.1f}", f"{mb / r['wall_s']:.2f}",
                 f"{r['tree_pss_mb']:.0f}"] for name, r in best.items()]
        print(f"corpus: first {mb:.1f} MB of {args.corpus}")
        print(M.table(["pipeline", "wall s", "MB/s", "peak tree PSS MB"], rows))
        ratio = best["datasets map"]["wall_s"] / best["bertlite prepare"]["wall_s"]
        print(f"bertlite / datasets throughput {ratio:.2f}x (target >= 1.5) "
              f"{M.check(ratio >= 1.5)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _run_hf(python: str, script: Path, corpus: Path, tokenizer: Path, cache: Path) -> dict:
    """The datasets pipeline in its own venv's Python, measured like a bertlite worker."""
    import os
    import subprocess

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([python, str(script), str(corpus), str(tokenizer), str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with M.TreeMemory(proc.pid) as tree:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the datasets pipeline failed:\n{err[-3000:]}")
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    result["wall_s"] = time.perf_counter() - start
    result["tree_pss_mb"] = tree.peak_mb
    return result


if __name__ == "__main__":
    sys.exit(main())
