"""The whole 50-step pretraining run of the book's configuration: bertlite against the book.

    python benchmarks/bench_run.py [--backend torch|mxnet|all] [--steps 50] [--no-sample]

Every run is a subprocess of its own, started cold (a fresh data cache), one after another:

* book: the chapter's ``train_bert`` loop written out inline for the backend's tab (the
  PyTorch tab with ``nn.DataParallel``, ``torch.optim.Adam(lr=0.01)``; the MXNet tab with
  ``split_and_load``, ``gluon.Trainer('adam')``), its data from d2l 0.17.6's ``_read_wiki`` and
  ``_WikiTextDataset`` and the book's ``DataLoader(..., shuffle=True, num_workers=4)``
  (``d2l.get_dataloader_workers()``), on WikiText-2's validation split; only the ``Animator``
  (a notebook plot) is left out;
* bertlite: ``bertlite.train(backend, split="valid", num_steps=50)`` (batch 512, max_len 64,
  tiny config, Adam lr 0.01), no plot;
* ``bertlite pretrain --corpus sample`` with every default (50 steps, batch 512 x 64, the
  plot written), cold and then with the data cache warm. Target: < 60 s.

Reported: the process's wall time (imports included), the run's wall time (data preparation,
model, 50 steps; from inside the process), pairs/s as the book prints it (its timer covers
the steps only), the peak RSS of the main process, the largest peak RSS of a DataLoader
worker (``RUSAGE_CHILDREN`` inside the run), and the peak PSS of the whole process tree
(sampled every 50 ms; shared pages counted once). The runs are sequential, so this shared
machine's load can differ between them: compare ratios of runs made close in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

BACKENDS = ("torch", "mxnet")


# ----------------------------------------------------------------------------- worker side


def _train_folder(data_dir: Path, work: Path) -> Path:
    """A folder whose wiki.train.tokens is the validation split (the book reads train)."""
    folder = work / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "wiki.train.tokens"
    if not link.exists():
        link.symlink_to((data_dir / "wiki.valid.tokens").resolve())
    return folder


def book_torch(folder: Path, num_steps: int) -> dict:
    """The chapter's PyTorch tab: load_data_wiki's body on a local folder, train_bert."""
    import torch
    from _reference import import_d2l
    from torch import nn

    d2l = import_d2l("torch")
    start = time.perf_counter()
    # d2l.load_data_wiki(batch_size, max_len), with the local folder for download_extract
    batch_size, max_len = 512, 64
    num_workers = d2l.get_dataloader_workers()
    paragraphs = d2l._read_wiki(str(folder))
    train_set = d2l._WikiTextDataset(paragraphs, max_len)
    train_iter = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True,
                                             num_workers=num_workers)
    vocab = train_set.vocab
    data_s = time.perf_counter() - start

    net = d2l.BERTModel(len(vocab), num_hiddens=128, norm_shape=[128], ffn_num_input=128,
                        ffn_num_hiddens=256, num_heads=2, num_layers=2, dropout=0.2,
                        key_size=128, query_size=128, value_size=128, hid_in_features=128,
                        mlm_in_features=128, nsp_in_features=128)
    devices = d2l.try_all_gpus()
    loss = nn.CrossEntropyLoss()

    # train_bert(train_iter, net, loss, len(vocab), devices, num_steps), without the Animator
    vocab_size = len(vocab)
    net = nn.DataParallel(net, device_ids=devices).to(devices[0])
    trainer = torch.optim.Adam(net.parameters(), lr=0.01)
    step, timer = 0, d2l.Timer()
    metric = d2l.Accumulator(4)
    num_steps_reached = False
    while step < num_steps and not num_steps_reached:
        for tokens_X, segments_X, valid_lens_x, pred_positions_X,\
                mlm_weights_X, mlm_Y, nsp_y in train_iter:
            tokens_X = tokens_X.to(devices[0])
            segments_X = segments_X.to(devices[0])
            valid_lens_x = valid_lens_x.to(devices[0])
            pred_positions_X = pred_positions_X.to(devices[0])
            mlm_weights_X = mlm_weights_X.to(devices[0])
            mlm_Y, nsp_y = mlm_Y.to(devices[0]), nsp_y.to(devices[0])
            trainer.zero_grad()
            timer.start()
            mlm_l, nsp_l, l = d2l._get_batch_loss_bert(
                net, loss, vocab_size, tokens_X, segments_X, valid_lens_x,
                pred_positions_X, mlm_weights_X, mlm_Y, nsp_y)
            l.backward()
            trainer.step()
            metric.add(mlm_l, nsp_l, tokens_X.shape[0], 1)
            timer.stop()
            step += 1
            if step == num_steps:
                num_steps_reached = True
                break
    del train_iter  # the workers exit and are waited for: RUSAGE_CHILDREN covers them
    return {"run_s": time.perf_counter() - start, "data_s": data_s,
            "pairs_per_s": metric[2] / timer.sum(), "mlm_loss": metric[0] / metric[3],
            "nsp_loss": metric[1] / metric[3], "steps": step, "workers": num_workers}


def book_mxnet(folder: Path, num_steps: int) -> dict:
    """The chapter's MXNet tab: load_data_wiki's body on a local folder, train_bert."""
    from _reference import import_d2l
    from mxnet import autograd, gluon, init, npx

    d2l = import_d2l("mxnet")
    npx.set_np()
    start = time.perf_counter()
    batch_size, max_len = 512, 64
    num_workers = d2l.get_dataloader_workers()
    paragraphs = d2l._read_wiki(str(folder))
    train_set = d2l._WikiTextDataset(paragraphs, max_len)
    train_iter = gluon.data.DataLoader(train_set, batch_size, shuffle=True,
                                       num_workers=num_workers)
    vocab = train_set.vocab
    data_s = time.perf_counter() - start

    net = d2l.BERTModel(len(vocab), num_hiddens=128, ffn_num_hiddens=256, num_heads=2,
                        num_layers=2, dropout=0.2)
    devices = d2l.try_all_gpus()
    net.initialize(init.Xavier(), ctx=devices)
    loss = gluon.loss.SoftmaxCELoss()

    # train_bert(train_iter, net, loss, len(vocab), devices, num_steps), without the Animator
    vocab_size = len(vocab)
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 0.01})
    step, timer = 0, d2l.Timer()
    metric = d2l.Accumulator(4)
    num_steps_reached = False
    while step < num_steps and not num_steps_reached:
        for batch in train_iter:
            (tokens_X_shards, segments_X_shards, valid_lens_x_shards,
             pred_positions_X_shards, mlm_weights_X_shards,
             mlm_Y_shards, nsp_y_shards) = [gluon.utils.split_and_load(
                 elem, devices, even_split=False) for elem in batch]
            timer.start()
            with autograd.record():
                mlm_ls, nsp_ls, ls = d2l._get_batch_loss_bert(
                    net, loss, vocab_size, tokens_X_shards, segments_X_shards,
                    valid_lens_x_shards, pred_positions_X_shards,
                    mlm_weights_X_shards, mlm_Y_shards, nsp_y_shards)
            for l in ls:
                l.backward()
            trainer.step(1)
            mlm_l_mean = sum([float(l) for l in mlm_ls]) / len(mlm_ls)
            nsp_l_mean = sum([float(l) for l in nsp_ls]) / len(nsp_ls)
            metric.add(mlm_l_mean, nsp_l_mean, batch[0].shape[0], 1)
            timer.stop()
            step += 1
            if step == num_steps:
                num_steps_reached = True
                break
    del train_iter
    return {"run_s": time.perf_counter() - start, "data_s": data_s,
            "pairs_per_s": metric[2] / timer.sum(), "mlm_loss": metric[0] / metric[3],
            "nsp_loss": metric[1] / metric[3], "steps": step, "workers": num_workers}


def bertlite_run(backend: str, data_dir: Path, num_steps: int) -> dict:
    import bertlite

    start = time.perf_counter()
    result = bertlite.train(backend, corpus="wikitext-2", data_dir=data_dir, split="valid",
                            num_steps=num_steps, plot=None, progress=False, verbose=False)
    history = result.history
    return {"run_s": time.perf_counter() - start, "pairs_per_s": history.pairs_per_sec,
            "mlm_loss": history.mean_mlm_loss, "nsp_loss": history.mean_nsp_loss,
            "steps": result.num_steps, "workers": 0}


def worker(args) -> dict:
    import resource

    kind, backend = args.worker.split(":")
    if kind == "book":
        with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
            folder = _train_folder(args.data_dir, Path(tmp))
            out = (book_torch if backend == "torch" else book_mxnet)(folder, args.steps)
    else:
        out = bertlite_run(backend, args.data_dir, args.steps)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {**out, "peak_rss_mb": M.peak_rss_mb(),
            "worker_peak_rss_mb": children if children else None}


# ----------------------------------------------------------------------------- driver side


def run_process(args, kind: str, backend: str, cache: Path) -> dict:
    cmd = ["--worker", f"{kind}:{backend}", "--data-dir", str(args.data_dir), "--steps",
           str(args.steps)]
    env = {"BERTLITE_CACHE": str(cache), "OMP_NUM_THREADS": str(args.threads)}
    return M.run_worker(Path(__file__).resolve(), cmd, env=env, timeout=args.timeout)


def pretrain_sample(backend: str, cache: Path, cwd: Path, timeout: float) -> dict:
    """``bertlite pretrain --corpus sample`` with every default, timed from outside."""
    import subprocess

    env = {**os.environ, "BERTLITE_CACHE": str(cache), "BERTLITE_BACKEND": backend,
           "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bertlite", "pretrain", "--corpus", "sample",
                           "--no-progress"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bertlite pretrain failed:\n{proc.stderr[-3000:]}")
    summary = [line for line in proc.stdout.splitlines() if "pairs/sec" in line or "MLM" in line]
    return {"wall_s": wall, "summary": summary}


def measure(args) -> dict:
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    runs, sample = [], []
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        tmp = Path(tmp)
        for backend in backends:
            for kind in ("book", "bertlite"):
                print(f"  run: {kind} {backend} ...", file=sys.stderr, flush=True)
                cache = tmp / f"cache-{kind}-{backend}"  # cold: nothing prepared yet
                runs.append({"kind": kind, "backend": backend,
                             **run_process(args, kind, backend, cache)})
        if args.sample:
            for backend in backends:
                cache = tmp / f"cache-sample-{backend}"
                for state in ("cold", "warm") if getattr(args, "sample_warm", True) else ("cold",):
                    print(f"  pretrain --corpus sample: {backend} ({state}) ...",
                          file=sys.stderr, flush=True)
                    sample.append({"backend": backend, "cache": state,
                                   **pretrain_sample(backend, cache, tmp, args.timeout)})
    return {"runs": runs, "sample": sample, "steps": args.steps,
            "machine": M.describe(args.threads)}


def report(res: dict, file=None) -> str:
    out = [f"\nWhole run: {res['steps']} steps, batch 512 x 64, tiny config, WikiText-2 valid; "
           "each run a cold process of its own",
           f"machine: {M.machine_line(res['machine'])}"]
    rows, by = [], {(r["kind"], r["backend"]): r for r in res["runs"]}
    for r in res["runs"]:
        book = by.get(("book", r["backend"]))
        worker = r.get("worker_peak_rss_mb")
        rows.append([f"{r['kind']} {r['backend']}", f"{r['wall_s']:.1f}", f"{r['run_s']:.1f}",
                     f"{r['pairs_per_s']:.0f}", f"{r['mlm_loss']:.3f}", f"{r['nsp_loss']:.3f}",
                     f"{r['peak_rss_mb']:.0f}", f"{worker:.0f}" if worker else "-",
                     f"{r['tree_pss_mb']:.0f}", str(r["max_processes"]),
                     f"{book['wall_s'] / r['wall_s']:.2f}x" if book else "",
                     f"{r['pairs_per_s'] / book['pairs_per_s']:.2f}x" if book else ""])
    out.append(M.table(["run", "process s", "run s", "pairs/s", "MLM loss", "NSP loss",
                        "peak RSS MB", "worker RSS MB", "tree PSS MB", "procs",
                        "wall vs book", "pairs/s vs book"], rows))
    out.append("process s: the subprocess's wall time; run s: data + model + steps, inside it; "
               "pairs/s: the book's metric (step time only); the book's PyTorch MLM loss is "
               "unmasked (its known defect), bertlite's masked")
    if res["sample"]:
        out.append("")
        rows = []
        for s in res["sample"]:
            rows.append([s["backend"], s["cache"], f"{s['wall_s']:.1f}",
                         M.check(s["wall_s"] < 60), "; ".join(s["summary"])])
        out.append(M.table(["bertlite pretrain --corpus sample", "data cache", "wall s",
                            "< 60 s", "summary"], rows, "<<><<"))
    text = "\n".join(out)
    print(text, file=file or sys.stdout)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all")
    parser.add_argument("--data-dir", type=Path, default=M.DEFAULT_DATA_DIR)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2,
                        help="OMP_NUM_THREADS of the runs (MXNet's default is half the CPUs)")
    parser.add_argument("--no-sample", dest="sample", action="store_false",
                        help="skip `bertlite pretrain --corpus sample`")
    parser.add_argument("--sample-cold-only", dest="sample_warm", action="store_false",
                        help="run `bertlite pretrain --corpus sample` with a cold cache only")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not (args.data_dir / "wiki.valid.tokens").is_file():
        sys.exit(f"WikiText-2 not found: {args.data_dir} has no wiki.valid.tokens")
    res = measure(args)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
