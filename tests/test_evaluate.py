"""Held-out evaluation for every installed backend: sane metrics, chance level before training and
better after, the same numbers from either backend, evaluation during training (history and
plot), the ``bertlite evaluate`` command; and the book's polysemy study (examples/polysemy.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import bertlite
from bertlite.config import resolve_config
from bertlite.errors import DataError
from bertlite.params import init_params
from bertlite.plot import plot_history
from bertlite.registry import get_backend
from bertlite.trainer import History

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.1,
             max_len=64)
STEPS, EVAL_EVERY = 40, 20
_RUNS: dict[str, tuple] = {}


def trained(backend_name: str, tmp_path_factory) -> tuple[bertlite.TrainResult, Path, Path]:
    """A small BERT trained for a few dozen steps on the sample corpus, evaluated on its
    held-out split during training; its loss plot and checkpoint (once per backend)."""
    if backend_name not in _RUNS:
        folder = tmp_path_factory.mktemp(f"eval-{backend_name}")
        result = bertlite.train(backend_name, corpus="sample", config=SMALL, batch_size=32,
                                max_len=64, num_steps=STEPS, lr=0.01, seed=0,
                                plot=folder / "loss.png", progress=False, verbose=False,
                                eval_every=EVAL_EVERY, eval_split="valid")
        result.save(folder / "model")
        _RUNS[backend_name] = (result, folder / "loss.png", folder / "model")
    return _RUNS[backend_name]


def untrained(backend_name: str, vocab: bertlite.Vocab) -> bertlite.Pretrained:
    """The same model at its initial weights."""
    be = get_backend(backend_name)
    config = resolve_config(SMALL, len(vocab))
    devices = be.parse_devices("cpu")
    net = be.build_model(config, devices)
    be.load_state_dict(net, init_params(config, 0))
    return bertlite.Pretrained(net, be, vocab, config, devices,
                               metadata={"training": {"corpus": "sample", "max_len": 64}})


def assert_sane(metrics: dict) -> None:
    for key in ("mlm_accuracy", "mlm_accuracy_known", "unk_fraction", "nsp_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["mlm_loss"] > 0 and metrics["nsp_loss"] > 0
    assert metrics["mlm_perplexity"] == pytest.approx(math.exp(metrics["mlm_loss"]), rel=1e-12)
    assert isinstance(metrics["examples"], int) and metrics["examples"] > 100


def test_metrics_are_sane(backend_name, tmp_path_factory):
    result, _, _ = trained(backend_name, tmp_path_factory)
    metrics = bertlite.evaluate(result, corpus="sample", split="valid")
    assert_sane(metrics)
    # the sample's held-out split has words the training vocabulary lacks: <unk> labels
    assert 0.05 < metrics["unk_fraction"] < 0.5
    # fixed masks: evaluating twice gives the same numbers; fewer batches, fewer examples
    assert bertlite.evaluate(result, corpus="sample", split="valid") == metrics
    part = bertlite.evaluate(result, corpus="sample", split="valid", batch_size=32,
                             max_batches=2)
    assert part["examples"] == 64
    with pytest.raises(DataError, match="exceeds the model's positional table"):
        bertlite.evaluate(result, corpus="sample", max_len=128)


def test_untrained_is_at_chance_trained_is_better(backend_name, tmp_path_factory):
    result, _, _ = trained(backend_name, tmp_path_factory)
    before = bertlite.evaluate(untrained(backend_name, result.vocab), corpus="sample",
                               split="valid")
    after = bertlite.evaluate(result, corpus="sample", split="valid")
    assert_sane(before)
    size = len(result.vocab)
    # at the initial weights the MLM head is close to uniform: loss ln|V|, perplexity |V|,
    # masked-token accuracy about 1/|V|, NSP a coin flip
    assert abs(before["mlm_loss"] - math.log(size)) < 0.1
    assert 0.8 * size < before["mlm_perplexity"] < 1.25 * size
    assert before["mlm_accuracy"] < 0.02
    assert abs(before["nsp_loss"] - math.log(2)) < 0.35 and abs(before["nsp_accuracy"] - 0.5) < 0.15
    # a few dozen steps: much lower perplexity, higher accuracy on text it never saw
    assert after["mlm_perplexity"] < 0.3 * before["mlm_perplexity"]
    assert after["mlm_accuracy"] > before["mlm_accuracy"] + 0.1
    assert after["mlm_loss"] < before["mlm_loss"] - 1.0


def test_both_backends_give_the_same_numbers(tmp_path_factory):
    from conftest import skip_unless_backend

    skip_unless_backend("torch")
    skip_unless_backend("mxnet")
    _, _, checkpoint = trained("torch", tmp_path_factory)
    on_torch = bertlite.evaluate(checkpoint, backend="torch", split="valid")
    on_mxnet = bertlite.evaluate(checkpoint, backend="mxnet", split="valid")
    assert on_torch.keys() == on_mxnet.keys()
    for key, value in on_torch.items():
        assert on_mxnet[key] == pytest.approx(value, abs=1e-4), key


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_eval_every_records_history_and_a_second_panel(backend_name, tmp_path_factory,
                                                       tmp_path):
    result, plot, checkpoint = trained(backend_name, tmp_path_factory)
    evals = result.history.eval
    assert [e["step"] for e in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for entry in evals:
        assert_sane(entry)
    # the last entry is the final model on the same held-out split, same masks
    final = bertlite.evaluate(result, corpus="sample", split="valid")
    assert evals[-1]["mlm_loss"] == pytest.approx(final["mlm_loss"], rel=1e-9)
    assert evals[-1]["mlm_accuracy"] == pytest.approx(final["mlm_accuracy"], rel=1e-9)
    # the plot has a second panel: wider than the loss plot alone
    alone = plot_history(History(step=result.history.step, mlm_loss=result.history.mlm_loss,
                                 nsp_loss=result.history.nsp_loss), tmp_path / "alone.png")
    (width, height), (width_alone, height_alone) = png_size(plot), png_size(alone)
    assert width > 1.5 * width_alone and height == height_alone


def test_cli_evaluate_prints_the_line_and_json(backend_name, tmp_path_factory, capsys):
    from bertlite.cli import main

    result, _, checkpoint = trained(backend_name, tmp_path_factory)
    expected = bertlite.evaluate(result, corpus="sample", split="valid")
    capsys.readouterr()
    # the corpus defaults to the one the checkpoint was trained on (the sample here)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--split", "valid"]) == 0
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"valid: masked-token accuracy (\S+), MLM perplexity (\S+), "
                         r"NSP accuracy (\S+) \((\d+) examples\)", line)
    assert match, line
    assert float(match.group(1)) == pytest.approx(expected["mlm_accuracy"], abs=1e-4)
    assert float(match.group(2)) == pytest.approx(expected["mlm_perplexity"], abs=0.01)
    assert int(match.group(4)) == expected["examples"]
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--corpus", "sample",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data.keys() == expected.keys()
    assert data["mlm_perplexity"] == pytest.approx(expected["mlm_perplexity"], rel=1e-4)
    # a checkpoint that is not there: one line, exit status 2
    assert main(["evaluate", "--checkpoint", str(checkpoint / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- polysemy


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"bertlite_example_{name}",
                                                  REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_polysemy_example(backend_name, tmp_path, capsys):
    polysemy = load_example("polysemy")
    out = tmp_path / "polysemy.png"
    results = polysemy.main(["--backend", backend_name, "--steps", "10", "--batch-size", "32",
                             "--out", str(out)], config=SMALL)
    printed = capsys.readouterr().out
    pairs = re.findall(r'^  ([+-]\d\.\d{4})  ([+-]\d\.\d{4})  "', printed, re.M)
    numbers = [float(x) for pair in pairs for x in pair]
    assert len(numbers) == len(results) >= 12
    assert all(-1.0 <= x <= 1.0 for x in numbers)
    assert float(re.search(r"spread of the token vectors of the first input (\S+)",
                           printed).group(1)) > 0
    assert all(-1.0 <= x <= 1.0 and np.isfinite(x) for x in results.values())
    # "crane" gets another vector in another context
    crane = {k: v for k, v in results.items() if k.startswith("crane") and "centered" not in k}
    assert crane and all(v < 1 - 1e-4 for v in crane.values())
    assert out.is_file() and png_size(out)[0] > 400
