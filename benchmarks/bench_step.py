"""One training step (forward, backward, Adam update): bertlite against the book's code.

    python benchmarks/bench_step.py [--backend torch|mxnet|all] [--repeats 12] [--threads 2]

The batch is the first 512 x 64 batch of WikiText-2's validation split, prepared by
``bertlite.data.load_data_wiki(512, 64, split="valid")``; the model is the book's tiny BERT
(vocabulary 4,271, 2 layers, 128 hidden, 256 FFN, 2 heads, dropout 0.2) with Adam at lr 0.01:

* torch: bertlite's ``backend.train_step`` against d2l 0.17.6's ``BERTModel`` with the
  chapter's ``_get_batch_loss_bert``, ``nn.CrossEntropyLoss()`` and
  ``torch.optim.Adam(lr=0.01)``, on the same batch;
* mxnet: bertlite hybridized (the backend's default) and imperative against d2l 0.17.6's MXNet
  ``BERTModel`` with its ``_get_batch_loss_bert``, ``SoftmaxCELoss`` and
  ``gluon.Trainer('adam', lr 0.01)``. MXNet runs asynchronously, so every MXNet step ends with
  ``mx.nd.waitall()``: a step is timed until its update is done (its loss alone is ready after
  the forward pass), as a PyTorch step is.

Each implementation lives in a process of its own (so that none inherits another's heap or
caches) and they step in turn: the driver asks each for one step (the order rotates every
round), so all see the same load of this shared machine. Figures are medians over the rounds
after warm-up steps. Between rounds, ``torch.mm`` of two 2048 x 2048 float32 matrices with the
same threads samples the machine's matmul peak ("peak": the best sample). GFLOP/s count the
model's FLOPs analytically (``_machine.training_flops``), the same count for every
implementation, so that their ratio is the speed ratio; "executed" counts what each one
computes. Targets (torch): bertlite >= 2x the book's step and >= 60% of the peak.

``--flavors`` also steps bertlite with standard BERT's architecture options at the same sizes
(``BERTConfig.from_preset("tiny", V, flavor="bert")``: GELU, embedding LayerNorm, epsilon
1e-12, tied decoder), interleaved with the book's flavour in every round, and prints their
step-time ratio (median of the per-round ratios); target (torch): at most 1.10.

``--against REV`` steps this tree's bertlite against bertlite at git revision ``REV`` (its
``bertlite/`` and ``backends/`` exported by ``git archive`` to a temporary folder that the
other process imports first), in turn, on the same batch (dropout 0.2 on), and prints them and
their speed ratios instead of the tables above (repeat ``--against`` for several revisions;
``--corpus sample``: the quick start's corpus instead of WikiText-2)::

    python benchmarks/bench_step.py --against fe14bed^1 --corpus sample --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

BACKENDS = ("torch", "mxnet")
IMPLS = {"torch": ("book", "bertlite"), "mxnet": ("book", "bertlite", "bertlite imperative")}
#: glibc malloc settings that stop its per-step page faults (documented advice, not code): a
#: fixed mmap threshold at glibc's maximum (32 MiB) and no trimming of the heap's top, and
#: transparent huge pages for the heap (glibc >= 2.35)
MALLOC_ADVICE = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                 "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
ADVISED = " + malloc env"
#: the implementation name of bertlite with standard BERT's flavour (``--flavors``)
BERT_FLAVOUR = "bertlite bert-flavour"
TINY = {"num_hiddens": 128, "ffn_num_hiddens": 256, "num_layers": 2}


# ----------------------------------------------------------------------------- worker side


def load_batch(data_dir: Path, batch_size: int, max_len: int, corpus: str = "wikitext-2"):
    """The first batch of the validation split (``corpus="sample"``: of the sample corpus's
    training split, as the quick start reads it) and the vocabulary size."""
    from bertlite.data import load_data_wiki

    if corpus == "sample":
        batches, vocab = load_data_wiki(batch_size, max_len, corpus="sample", cache=False)
    else:
        batches, vocab = load_data_wiki(batch_size, max_len, data_dir=data_dir, split="valid")
    return next(iter(batches)), len(vocab)


def model_flops(batch, vocab_size: int, *, all_slots: bool = False,
                num_tokens: int | None = None, attention_pairs: int | None = None) -> float:
    """Training FLOPs of the tiny config on ``batch`` (MLM head on the predicted positions,
    or with ``all_slots`` on every prediction slot as the book computes it)."""
    import numpy as np

    b, n = batch.tokens.shape
    weights = np.asarray(batch.mlm_weights)
    preds = weights.size if all_slots else int(np.count_nonzero(weights))
    return M.training_flops(TINY["num_hiddens"], TINY["ffn_num_hiddens"], TINY["num_layers"],
                            vocab_size, b, n, preds, num_tokens, attention_pairs)


def _torch_book(batch, vocab_size: int):
    import numpy as np
    import torch
    from _reference import import_d2l

    d2l = import_d2l("torch")
    torch.manual_seed(0)
    net = d2l.BERTModel(vocab_size, num_hiddens=128, norm_shape=[128], ffn_num_input=128,
                        ffn_num_hiddens=256, num_heads=2, num_layers=2, dropout=0.2,
                        key_size=128, query_size=128, value_size=128, hid_in_features=128,
                        mlm_in_features=128, nsp_in_features=128)
    trainer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss = torch.nn.CrossEntropyLoss()
    # the dtypes of the book's _WikiTextDataset: int64 ids, float32 valid_lens and weights
    tensors = [torch.tensor(np.asarray(a), dtype=torch.float32 if a.dtype.kind == "f"
                            else torch.int64) for a in batch]

    def step(wait: bool = True):
        trainer.zero_grad()
        mlm_l, _, l = d2l._get_batch_loss_bert(net, loss, vocab_size, *tensors)
        l.backward()
        trainer.step()
        return float(mlm_l.detach())

    return step, model_flops(batch, vocab_size, all_slots=True)


def _bertlite(backend: str, batch, vocab_size: int, hybridize: bool = True,
              flavor: str | None = None):

    from bertlite.config import BERTConfig
    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params
    from bertlite.registry import get_backend

    config = BERTConfig.from_preset("tiny", vocab_size, flavor=flavor)
    be = get_backend(backend)
    net = be.build_model(config, be.parse_devices("cpu"))
    if not hybridize:
        net.hybridize(active=False)
    be.load_state_dict(net, init_params(config, 0))
    opt = be.create_optimizer(net, OptimizerSettings(lr=0.01))
    state = {"step": 0}

    try:  # the dropout masks' key, as the trainer passes it (absent before it existed)
        from bertlite.backend import dropout_key
    except ImportError:
        def dropout_key(backend, seed, step):
            return {}

    def step(wait: bool = True):
        be.seed(state["step"])  # as the trainer does before every step
        key = dropout_key(be, 0, state["step"])
        state["step"] += 1
        mlm, _ = be.train_step(net, opt, batch, 0.01, **key)
        if backend == "mxnet" and wait:
            _mxnet_wait()
        return float(mlm)

    if backend == "torch":
        executed = executed_flops(batch, vocab_size)
    else:
        executed = (mxnet_executed_flops(batch, vocab_size) if hybridize
                    else model_flops(batch, vocab_size, all_slots=True))
    return step, executed


def _mxnet_wait() -> None:
    """Wait for every MXNet operation pushed so far. MXNet runs asynchronously: the loss of a
    step is ready after its forward pass, while its backward pass and update still run, and
    would run on into the next implementation's timed step (and the 0.1 s pause before it).
    Waiting makes an MXNet step, like a PyTorch one, end when its update is done."""
    import mxnet as mx

    mx.nd.waitall()


def mxnet_executed_flops(batch, vocab_size: int) -> float:
    """The matmul FLOPs bertlite's hybridized MXNet training step performs on ``batch``: every
    layer but the last on all ``batch * length`` positions; the last one's keys and values
    there too, its queries, output projection and FFN at the ``1 + preds`` rows the loss reads
    (``<cls>`` and every prediction slot); the MLM head on every slot."""
    h, f, layers = TINY["num_hiddens"], TINY["ffn_num_hiddens"], TINY["num_layers"]
    b, n = batch.tokens.shape
    slots = batch.mlm_weights.size
    rows = b + slots
    full = 6 * (4 * h * h + 2 * h * f) * b * n + 12 * h * b * n * n
    last = 6 * 2 * h * h * b * n + 6 * (2 * h * h + 2 * h * f) * rows + 12 * h * rows * n
    heads = 6 * (h * h + h * vocab_size) * slots + 6 * (h * h + 2 * h) * b
    return float((layers - 1) * full + last + heads)


def executed_flops(batch, vocab_size: int) -> float:
    """The matmul FLOPs bertlite's torch backend performs on ``batch`` (see its model's
    packed path): projections on the attention groups' slots, the rest on the valid tokens;
    attention per length group; the last layer's queries, output projection and FFN only at
    the predicted positions and ``<cls>``."""
    import numpy as np
    import torch

    from bertlite.backends.torch.model import MaskLM
    from bertlite.backends.torch.packing import pack, select

    h, f, layers = TINY["num_hiddens"], TINY["ffn_num_hiddens"], TINY["num_layers"]
    b, _ = batch.tokens.shape
    valid_lens = torch.from_numpy(np.asarray(batch.valid_lens))
    packing = pack(valid_lens, *batch.tokens.shape)
    weights = torch.from_numpy(np.asarray(batch.mlm_weights)).reshape(-1)
    rows = MaskLM.rows(torch.from_numpy(np.asarray(batch.tokens)),
                       torch.from_numpy(np.asarray(batch.pred_positions))).reshape(-1)[
        torch.nonzero(weights).reshape(-1)]
    queries = select(packing, valid_lens, rows)
    tokens, slots = packing.rows.shape[0], packing.num_slots
    dense = 6 * (3 * h * h * slots + (h * h + 2 * h * f) * tokens) \
        + 12 * h * sum(size * n * n for size, n, _ in packing.groups)
    outputs = queries.rows.shape[0]
    last = 6 * (2 * h * h * slots + h * h * queries.num_slots + (h * h + 2 * h * f) * outputs) \
        + 12 * h * sum(size * m * n for (size, m, _), (_, n, _)
                       in zip(queries.groups, packing.groups))
    heads = 6 * (h * h + h * vocab_size) * int(weights.count_nonzero()) \
        + 6 * (h * h + 2 * h) * b
    return float((layers - 1) * dense + last + heads)


def _mxnet_book(batch, vocab_size: int):
    import mxnet as mx
    import numpy as np
    from _reference import import_d2l
    from mxnet import autograd, gluon, init, npx

    d2l = import_d2l("mxnet")
    npx.set_np()
    mx.random.seed(0)
    net = d2l.BERTModel(vocab_size, num_hiddens=128, ffn_num_hiddens=256, num_heads=2,
                        num_layers=2, dropout=0.2)
    devices = [mx.cpu()]
    net.initialize(init.Xavier(), ctx=devices)
    loss = gluon.loss.SoftmaxCELoss()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    arrays = [mx.np.array(np.asarray(a), dtype=np.asarray(a).dtype) for a in batch]

    def step(wait: bool = True):
        shards = [gluon.utils.split_and_load(a, devices, even_split=False) for a in arrays]
        with autograd.record():
            mlm_ls, _, ls = d2l._get_batch_loss_bert(net, loss, vocab_size, *shards)
        for l in ls:
            l.backward()
        trainer.step(1)
        if wait:
            _mxnet_wait()
        return float(mlm_ls[0])

    return step, model_flops(batch, vocab_size, all_slots=True)


def serve(args) -> None:
    """Build one implementation, then answer the driver: ``step`` runs one timed step,
    ``peak`` samples the matmul peak, ``quit`` reports the peak RSS and exits."""
    backend, impl = args.serve.split(":")
    impl = impl.removesuffix(ADVISED)
    if backend == "mxnet":
        import mxnet  # noqa: F401  (before torch: it reads its thread count at import)
    import torch

    torch.set_num_threads(args.threads)
    batch, vocab_size = load_batch(args.data_dir, args.batch_size, args.max_len, args.corpus)
    if impl.startswith("bertlite@"):  # another revision's, imported first (Server)
        impl = "bertlite"
    if impl == "book":
        step, executed = (_torch_book if backend == "torch" else _mxnet_book)(batch, vocab_size)
    elif impl == BERT_FLAVOUR:
        step, executed = _bertlite(backend, batch, vocab_size, True, flavor="bert")
    else:
        step, executed = _bertlite(backend, batch, vocab_size, impl == "bertlite")
    peak = M.MatmulPeak()
    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": True, "flops": model_flops(batch, vocab_size),
                      "executed_flops": executed, "batch": list(batch.tokens.shape),
                      "predictions": int((batch.mlm_weights != 0).sum()),
                      "slots": int(batch.mlm_weights.size),
                      "valid_tokens": int(batch.valid_lens.sum()),
                      "rss_after_warmup_mb": M.rss_mb()}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":  # --steps-per-round steps, as the trainer runs them
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps_per_round):
                loss = step(wait=i == args.steps_per_round - 1)
            print(json.dumps({"s": (time.perf_counter() - start) / args.steps_per_round,
                              "cpu_s": (time.process_time() - cpu) / args.steps_per_round,
                              "loss": loss}), flush=True)
        elif command == "peak":
            peak.sample(3)
            print(json.dumps({"gflops": peak.gflops}), flush=True)
        else:
            print(json.dumps({"peak_rss_mb": M.peak_rss_mb(),
                              "threads": torch.get_num_threads()}), flush=True)
            return


# ----------------------------------------------------------------------------- driver side


class Server:
    """One implementation's process, stepped by the driver."""

    def __init__(self, backend: str, impl: str, args, pythonpath: Path | None = None) -> None:
        self.name = impl
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", f"{backend}:{impl}",
               "--data-dir", str(args.data_dir), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--max-len", str(args.max_len), "--corpus", args.corpus,
               "--steps-per-round", str(args.steps_per_round)]
        # MXNet's CPU operators take their thread count from the environment at import
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
               "MPLBACKEND": "Agg", **(MALLOC_ADVICE if impl.endswith(ADVISED) else {})}
        if pythonpath is not None:  # another revision's bertlite, found before this tree's
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath),
                                                 *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.times, self.cpu = [], []

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()
                raise RuntimeError(f"the {self.name} process ended:\n{err[-4000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def step(self) -> None:
        time.sleep(0.1)  # let the previous process's OpenMP threads stop spinning
        reply = self.ask("step")
        self.times.append(reply["s"])
        self.cpu.append(reply["cpu_s"])

    def close(self) -> dict:
        reply = self.ask("quit")
        self.proc.wait()
        return reply


def export_revision(rev: str, folder: Path) -> Path:
    """``bertlite/`` and ``backends/`` of git revision ``rev`` as an importable ``bertlite``
    package (backends at ``bertlite/backends``, as the installed layout has them) under
    ``folder``; the folder to put first on ``PYTHONPATH``."""
    repo = M.REPO
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "bertlite", "backends"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"--against {rev}: git archive failed: {archive.stderr.decode().strip()}")
    raw = folder / "raw"
    raw.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(raw)], input=archive.stdout, check=True)
    site = folder / "site"
    site.mkdir()
    shutil.move(str(raw / "bertlite"), site / "bertlite")
    shutil.move(str(raw / "backends"), site / "bertlite" / "backends")
    return site


def measure(backend: str, args) -> dict:
    """Start every implementation of ``backend``, step them in turn, return the figures."""
    impls = list(IMPLS[backend])
    if args.malloc_advice and backend == "torch":
        impls += [impl + ADVISED for impl in IMPLS[backend]]
    if args.flavors:
        impls.append(BERT_FLAVOUR)
    paths: dict[str, Path | None] = {}
    if args.against:
        impls = ["bertlite", *(f"bertlite@{rev}" for rev in args.against)]
        paths.update(zip(impls[1:], args.against_paths))
    servers = [Server(backend, impl, args, paths.get(impl)) for impl in impls]
    try:
        ready = [s.read() for s in servers]  # they warm up concurrently
        peak = 0.0
        for r in range(args.repeats):
            shift = r % len(servers)
            for server in servers[shift:] + servers[:shift]:
                server.step()
            peak = max(peak, servers[r % len(servers)].ask("peak")["gflops"])
        closing = [s.close() for s in servers]
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
    results = {}
    for server, info, end in zip(servers, ready, closing):
        results[server.name] = {**M.Timing(server.times).to_dict(), "cpu_s": server.cpu,
                                "executed_flops": info["executed_flops"],
                                "peak_rss_mb": end["peak_rss_mb"], "threads": end["threads"]}
    return {"backend": backend, "results": results, "flops": ready[0]["flops"],
            "peak_gflops": peak, "batch": ready[0]["batch"],
            "predictions": ready[0]["predictions"], "slots": ready[0]["slots"],
            "valid_tokens": ready[0]["valid_tokens"],
            "warmup": args.warmup, "machine": M.describe(args.threads)}


def report_against(results: list[dict], file=None) -> str:
    """``--against``: this tree's step and the other revision's, and their ratio."""
    out = []
    for res in results:
        b, n = res["batch"]
        (name, mine), (other_name, other) = list(res["results"].items())[:2]
        out.append(f"\nTraining step, {res['backend']}: batch {b} x {n}, tiny config, dropout "
                   f"0.2; machine: {M.machine_line(res['machine'])}")
        rows = []
        for label, r in res["results"].items():
            cpu = sorted(r["cpu_s"])[len(r["cpu_s"]) // 2]
            rows.append([label, f"{b / r['median']:.0f}", f"{r['median']:.3f}",
                         f"{r['best']:.3f}", f"{100 * r['spread']:.0f}%", f"{cpu:.3f}",
                         f"{other['median'] / r['median']:.3f}x"])
        out.append(M.table(["implementation", "pairs/s", "s/step", "best s", "IQR",
                            "CPU s/step", f"speed vs {other_name}"], rows))
        out.append(f"medians of {len(mine['times'])} rounds after {res['warmup']} warm-up "
                   "steps, stepped in turn (the order rotating every round); CPU: process time "
                   "of the step, all threads")
    text = "\n".join(out)
    print(text, file=file or sys.stdout)
    return text


def report(results: list[dict], file=None) -> str:
    """The tables of :func:`measure`'s results, printed and returned as text."""
    if results and any(name.startswith("bertlite@") for name in results[0]["results"]):
        return report_against(results, file)
    out = []
    for res in results:
        peak, flops = res["peak_gflops"], res["flops"]
        b, n = res["batch"]
        book = res["results"]["book"]
        out.append(f"\nTraining step, {res['backend']}: batch {b} x {n} (WikiText-2 valid), tiny "
                   f"config, {res['predictions']:,} predicted positions; float32 matmul peak "
                   f"{peak:.0f} GFLOP/s (torch.mm 2048^2, best sample of this run)")
        out.append(f"machine: {M.machine_line(res['machine'])}")
        rows = []
        for name, r in res["results"].items():
            t = r["median"]
            gflops = flops / t / 1e9
            executed = r.get("executed_flops")
            hw = (f"{executed / t / 1e9:.0f} ({100 * executed / t / 1e9 / peak:.0f}%)"
                  if executed else "")
            rows.append([name, f"{b / t:.0f}", f"{t:.3f}", f"{r['best']:.3f}",
                         f"{100 * r['spread']:.0f}%", f"{gflops:.0f}",
                         f"{100 * gflops / peak:.0f}%", hw, f"{r['peak_rss_mb']:.0f}",
                         f"{book['median'] / t:.2f}x", f"{book['best'] / r['best']:.2f}x"])
        out.append(M.table(["implementation", "pairs/s", "s/step", "best s", "IQR", "GFLOP/s",
                            "of peak", "executed GFLOP/s", "peak RSS MB", "speed vs book",
                            "best vs best"], rows))
        out.append(f"medians of {len(book['times'])} rounds after {res['warmup']} warm-up steps; "
                   f"model FLOPs/step {flops / 1e9:.1f} G: {M.FLOPS_FORMULA}")
        out.append("executed GFLOP/s: the FLOPs each one performs (the book: the MLM head on all "
                   f"{res['slots']:,} prediction slots"
                   + (f"; bertlite: the {res['valid_tokens']:,} valid tokens of {b * n:,}, "
                      "attention per length group, the last layer only where the loss reads "
                      "it)" if res["backend"] == "torch" else
                      "; bertlite hybridized: all positions, the last layer's queries, output "
                      "projection and FFN only at <cls> and the prediction slots)"))
        if res["backend"] == "torch":
            bl = res["results"]["bertlite"]
            ratio = book["median"] / bl["median"]
            frac = flops / bl["median"] / 1e9 / peak
            out.append(f"targets: bertlite >= 2x the book's step: {ratio:.2f}x "
                       f"{M.check(ratio >= 2)}; >= 60% of the matmul peak: {100 * frac:.0f}% "
                       f"{M.check(frac >= 0.6)}")
            if "bertlite" + ADVISED in res["results"]:
                env = " ".join(f"{k}={v}" for k, v in MALLOC_ADVICE.items())
                out.append(f"'{ADVISED.strip(' +')}': the same in processes started with {env} "
                           "(bench_step --malloc-advice; see the README)")
        else:
            r = res["results"]
            speedup = r["bertlite imperative"]["median"] / r["bertlite"]["median"]
            out.append(f"bertlite hybridized is {speedup:.2f}x its imperative step")
        if BERT_FLAVOUR in res["results"]:
            out.append(flavour_ratio(res))
    text = "\n".join(out)
    print(text, file=file or sys.stdout)
    return text


def flavour_ratio(res: dict) -> str:
    """The BERT flavour's step time over the book flavour's (``--flavors``): the median of the
    per-round ratios (both stepped in the same round, so under the same load), the ratio of
    the medians and of the best rounds; target (torch): the paired median at most 1.10."""
    book, bert = res["results"]["bertlite"]["times"], res["results"][BERT_FLAVOUR]["times"]
    paired = sorted(b / a for a, b in zip(book, bert))
    mid = len(paired) // 2
    median = paired[mid] if len(paired) % 2 else (paired[mid - 1] + paired[mid]) / 2
    of_medians = res["results"][BERT_FLAVOUR]["median"] / res["results"]["bertlite"]["median"]
    of_best = res["results"][BERT_FLAVOUR]["best"] / res["results"]["bertlite"]["best"]
    target = f" {M.check(median <= 1.10)} (target <= 1.10)" if res["backend"] == "torch" else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"flavours: BERT flavour / book flavour step time, median of {len(paired)} paired "
            f"rounds {median:.3f}{target}; ratio of medians {of_medians:.3f}, of the best "
            f"rounds {of_best:.3f}; load average "
            f"{load} (1, 5, 15 min) at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all")
    parser.add_argument("--data-dir", type=Path, default=M.DEFAULT_DATA_DIR,
                        help=f"folder of WikiText-2's wiki.valid.tokens ({M.DEFAULT_DATA_DIR})")
    parser.add_argument("--repeats", type=int, default=12, help="timed rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (default 3)")
    parser.add_argument("--steps-per-round", type=int, default=1,
                        help="steps per timed round, run as the trainer runs them (MXNet: "
                             "its asynchronous work waited for only after the last); the "
                             "figures are per step (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--malloc-advice", action="store_true",
                        help="torch: also time both in processes with glibc malloc settings "
                             "that avoid per-step page faults")
    parser.add_argument("--flavors", action="store_true",
                        help="also time bertlite with standard BERT's flavour (same sizes) and "
                             "print its step-time ratio to the book flavour's")
    parser.add_argument("--against", metavar="REV", action="append",
                        help="step this tree's bertlite against git revision REV's, in turn "
                             "(repeat for several; ratios against the first)")
    parser.add_argument("--corpus", choices=("wikitext-2", "sample"), default="wikitext-2",
                        help="the batch's corpus: WikiText-2's validation split (default) or "
                             "the sample corpus (the quick start's)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args)
        return 0
    if args.corpus == "wikitext-2" and not (args.data_dir / "wiki.valid.tokens").is_file():
        sys.exit(f"WikiText-2 not found: {args.data_dir} has no wiki.valid.tokens "
                 "(use --data-dir, or --corpus sample)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        args.against_paths = [export_revision(rev, Path(tmp) / str(i))
                              for i, rev in enumerate(args.against or [])]
        for backend in (BACKENDS if args.backend == "all" else (args.backend,)):
            print(f"  step: {backend} ...", file=sys.stderr, flush=True)
            results.append(measure(backend, args))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
