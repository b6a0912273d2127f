"""The README, executed: every fenced ``bash`` and ``python`` block (and every ``$ `` console
block) is run, and what it prints is compared with the output the README shows; the figures the
prose quotes are recomputed and looked up in the text. A README that drifts fails here.

Markers, an HTML comment on the line(s) just before a fence (invisible on GitHub):

* ``<!-- doctest: skip REASON -->``: the block is not run (GPUs, clusters, the test matrix itself);
* ``<!-- doctest: replace OLD => NEW -->``: run the block with OLD replaced by NEW, to shrink long
  runs (``--steps 50 => --steps 2``); the shown text stays the user's;
* ``<!-- doctest: output -->`` before a plain fence: the exact stdout of the block before it;
  ``...`` stands for the rest of a line (machine-dependent figures live in
  ``benchmarks/quickstart.md``, written by ``benchmarks/bench_quickstart.py``).

Rules: in shell blocks, ``pip`` and ``tox`` commands are not run (the environment that runs these
tests is the installed one, and ``tox`` runs them). A block that names a backend (``--backend
mxnet``, ``backend="torch"``, ``train("torch"``) runs only where all it names are installed and
one of them is among the backends under test (so each runs in one tox env); one that names
``wikitext-2`` reads the shared test copy (``$BERTLITE_TEST_WIKITEXT``; ``split="valid"`` where a
marker asks for it) or is skipped. Blocks
run in the README's order in one folder and (Python) one namespace, which starts with
``bertlite`` imported and ``result``, a model trained for 2 steps on the sample corpus and
saved there as ``my-bert``; so every block that uses them runs even where the block that makes
them in the README is skipped. ``demo-bert`` is the quick start's own model (its encodings are
shown): a block that reads it runs where the quick start ran (the env testing torch).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import BACKEND_NAMES, REPO, WIKITEXT_DIR, framework_installed

README = REPO / "README.md"
MARKER = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
BACKEND_NAMED = re.compile(r"""(?:--backend[ =]|backend=["']|train\(["'])(torch|mxnet)\b""")
NOT_RUN = ("pip", "tox")  # install / test-matrix commands (see the module docstring)


@dataclass
class Block:
    """One fenced block of a markdown file and the doctest markers before it."""

    lang: str
    text: str
    line: int
    skip: str | None = None
    replace: list[tuple[str, str]] = field(default_factory=list)
    is_output: bool = False
    output: str | None = None  # the expected stdout (a following output block, or `$ ` lines)

    @property
    def runnable(self) -> bool:
        return self.lang in ("bash", "python") or self.text.startswith("$ ")

    def source(self) -> str:
        """The code to run: the console's command, with the markers' replacements."""
        text = self.text
        if self.lang == "" and text.startswith("$ "):
            text = text.splitlines()[0][2:]
        for old, new in self.replace:
            if old not in text:
                raise AssertionError(f"README.md:{self.line}: replace marker: {old!r} is not in "
                                     "the block (update the marker with the block)")
            text = text.replace(old, new)
        return text


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with their markers; output blocks attached to the runnable
    block before them."""
    blocks: list[Block] = []
    pending: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            pending.append(marker.group(1))
        elif fence:
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            block = Block(fence.group(1), "\n".join(body), start + 1)
            for item in pending:
                word, _, rest = item.partition(" ")
                if word == "skip":
                    block.skip = rest or "marked skip"
                elif word == "replace":
                    old, sep, new = rest.partition(" => ")
                    if not sep:
                        raise AssertionError(f"{path.name}:{start}: replace marker needs "
                                             f"'OLD => NEW': {item!r}")
                    block.replace.append((old, new))
                elif word == "output":
                    block.is_output = True
                else:
                    raise AssertionError(f"{path.name}:{start}: unknown doctest marker {item!r}")
            pending = []
            if block.is_output:
                runnable = [b for b in blocks if b.runnable]
                if not runnable:
                    raise AssertionError(f"{path.name}:{start + 1}: output block before any code")
                runnable[-1].output = block.text
            elif block.lang == "" and block.text.startswith("$ "):
                block.output = "\n".join(block.text.splitlines()[1:])
            blocks.append(block)
        elif line.strip():
            pending = []  # a marker belongs to the fence right after it
        i += 1
    return blocks


BLOCKS = [b for b in parse_blocks(README) if b.runnable]


def expected_pattern(expected: str) -> re.Pattern:
    """``expected`` as a regex of whole lines; ``...`` matches the rest of a line."""
    parts = [".*".join(re.escape(piece) for piece in line.rstrip().split("..."))
             for line in expected.strip("\n").splitlines()]
    return re.compile("\n".join(parts))


def check_output(block: Block, stdout: str) -> None:
    if block.output is None:
        return
    actual = "\n".join(line.rstrip() for line in stdout.strip("\n").splitlines())
    if not expected_pattern(block.output).fullmatch(actual):
        raise AssertionError(f"README.md:{block.line}: the output differs from the README's.\n"
                             f"README shows:\n{block.output}\n\nthe command printed:\n{actual}")


def shell_script(text: str) -> str:
    """The block's commands without the ``pip``/``tox`` ones (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    kept = []
    for line in joined.splitlines():
        parts = [p for p in line.split(" && ") if p.split()[:1] and p.split()[0] not in NOT_RUN]
        if parts:
            kept.append(" && ".join(parts))
    return "\n".join(kept)


@pytest.fixture(scope="session")
def docs_env(tmp_path_factory) -> dict:
    """The folder and Python namespace the README's blocks share, with a trained model."""
    import bertlite

    installed = [n for n in BACKEND_NAMES if framework_installed(n)]
    if not installed:
        pytest.skip(f"no backend of {BACKEND_NAMES} is installed")
    folder = tmp_path_factory.mktemp("readme")
    cache = tmp_path_factory.getbasetemp() / "cache"  # the session's (conftest), not the user's
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BERTLITE_CACHE", str(cache))
        result = bertlite.train(installed[0], corpus="sample", num_steps=2, batch_size=64,
                                plot=None, progress=False, verbose=False)
    result.save(folder / "my-bert")
    (folder / "examples").symlink_to(REPO / "examples")
    return {"dir": folder, "cache": cache, "ns": {"bertlite": bertlite, "result": result},
            "result": result}


def _requirements(block: Block, folder: Path) -> None:
    if "demo-bert" in block.text and "--save demo-bert" not in block.text \
            and not (folder / "demo-bert").is_dir():
        pytest.skip("reads demo-bert, which the quick start saves (in the env testing torch)")
    named = set(BACKEND_NAMED.findall(block.text))
    missing = sorted(n for n in named if not framework_installed(n))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed here")
    if named and not named & set(BACKEND_NAMES):
        pytest.skip(f"runs in the env testing {' or '.join(sorted(named))}")
    if "wikitext-2" in block.text:  # the shared copy may hold the valid and test splits only
        split = "valid" if 'split="valid"' in block.source() else "train"
        if not (WIKITEXT_DIR / f"wiki.{split}.tokens").is_file():
            pytest.skip(f"WikiText-2's {split} split not found in {WIKITEXT_DIR}")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block(block: Block, docs_env, monkeypatch, capsys):
    """Run one block of the README; compare its stdout with the README's where it shows one."""
    if block.skip:
        pytest.skip(block.skip)
    _requirements(block, docs_env["dir"])
    monkeypatch.chdir(docs_env["dir"])
    monkeypatch.setenv("BERTLITE_CACHE", str(docs_env["cache"]))
    monkeypatch.setenv("BERTLITE_DATA", str(WIKITEXT_DIR.parent))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if block.lang == "python":
        capsys.readouterr()
        exec(compile(block.source(), f"README.md:{block.line}", "exec"), docs_env["ns"])
        check_output(block, capsys.readouterr().out)
        return
    script = shell_script(block.source())
    if not script:
        pytest.skip("only pip/tox commands (the environment running this is the installed one)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=docs_env["dir"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"README.md:{block.line}: exit status {proc.returncode}\n"
                                  f"{script}\n--- stderr:\n{proc.stderr[-3000:]}")
    check_output(block, proc.stdout)


# -- figures quoted in the prose ---------------------------------------------------------------

def readme_text() -> str:
    return " ".join(README.read_text(encoding="utf-8").split())  # line breaks as spaces


def assert_quoted(phrase: str, where: Path = README) -> None:
    text = " ".join(where.read_text(encoding="utf-8").split())
    assert phrase in text, f"{where.name} should say {phrase!r} (the figure the code gives now)"


def test_sample_corpus_size_quoted():
    from bertlite.data.corpus import read_corpus

    corpus = read_corpus(REPO / "bertlite" / "data" / "sample" / "wiki.train.tokens")
    words = f"{round(len(corpus.words), -3):,}"
    assert_quoted(f"~{words} words")
    assert_quoted(f"about {words} words", REPO / "bertlite" / "data" / "sample" / "README.md")


def test_unk_share_quoted(docs_env):
    import bertlite

    metrics = bertlite.evaluate(docs_env["result"], corpus="sample", split="valid")
    assert_quoted(f"{metrics['unk_fraction']:.0%} of the sample's held-out labels")


def test_info_chance_level_quoted():
    import bertlite

    config = bertlite.info(config="tiny")["config"]
    mlm = config["chance MLM loss ln|V| (vocab 20000)"]
    assert_quoted(f"prints {mlm:.3f} for its 20,000-word preset vocabulary")


def test_plan_figures_quoted():
    from bertlite.config import BERTConfig
    from bertlite.memory import GIB, estimate_memory

    config = BERTConfig.from_preset("large", 20000, max_len=512)
    big = estimate_memory(config, 512, 512)
    small = estimate_memory(config, 8, 512)
    assert_quoted(f"about {round(big.total / GIB, -1):.0f} GiB at the book's batch of 512")
    assert_quoted(f"`--batch-size 8`: {small.total / GIB:.1f} GiB")
    fixed = (big.total - big.activations) / GIB
    assert_quoted(f"({fixed:.1f} GiB for {config.num_parameters() / 1e6:.0f}M float32 parameters)")


def test_wikitext_vocabulary_quoted(wikitext_dir):
    from bertlite.data.corpus import read_corpus
    from bertlite.data.vocab import build_corpus_vocab

    for split in ("train", "valid"):
        path = wikitext_dir / f"wiki.{split}.tokens"
        if not path.is_file():  # the shared test copy may hold the valid and test splits only
            continue
        vocab, _ = build_corpus_vocab(read_corpus(path))
        assert_quoted(f"{math.log(len(vocab)):.2f} for the")
        assert_quoted(f"{len(vocab):,}")


def test_exercise_one_figures_quoted(wikitext_dir):
    """The book's setting (tiny BERT, the validation split as training text, batch 512,
    max_len 64, 50 steps, lr 0.01) and its held-out test metrics, as exercise 1 quotes them."""
    if "torch" not in BACKEND_NAMES or not framework_installed("torch"):
        pytest.skip("measured with PyTorch; runs in the env testing torch")
    import bertlite

    result = bertlite.train("torch", corpus=str(wikitext_dir), split="valid", batch_size=512,
                            max_len=64, num_steps=50, lr=0.01, plot=None, progress=False,
                            verbose=False)
    assert_quoted(f"`MLM loss {result.mlm_loss:.3f}, NSP loss {result.nsp_loss:.3f}`")
    chance_mlm = math.log(len(result.vocab))
    assert_quoted(f"i.e. {result.mlm_loss / chance_mlm:.2f} of the MLM chance level and "
                  f"{result.nsp_loss / math.log(2):.2f} of NSP's")
    test = bertlite.evaluate(result, corpus=str(wikitext_dir), split="test")
    assert_quoted(f"MLM loss {test['mlm_loss']:.2f} (perplexity {test['mlm_perplexity']:.0f})")
    assert_quoted(f"masked-token accuracy {test['mlm_accuracy']:.3f}")
    assert_quoted(f"{test['mlm_accuracy_known']:.3f} on known words")
    assert_quoted(f"NSP accuracy {test['nsp_accuracy']:.3f}")


def test_quickstart_speed_table_is_generated_and_current():
    """The machine-dependent figures the README links come from bench_quickstart.py, with the
    machine and the date, and from a run that printed the README's (deterministic) losses."""
    table = REPO / "benchmarks" / "quickstart.md"
    assert "(benchmarks/quickstart.md)" in README.read_text(encoding="utf-8")
    text = table.read_text(encoding="utf-8")
    assert "Generated by `python benchmarks/bench_quickstart.py`" in text
    assert re.search(r"^- date: \d{4}-\d\d-\d\d", text, re.M)
    assert re.search(r"^- machine: .+ logical CPUs", text, re.M)
    losses = re.search(r"^MLM loss [\d.]+, NSP loss [\d.]+$", README.read_text(encoding="utf-8"),
                       re.M).group(0)
    rows = [line for line in text.splitlines() if line.startswith("| torch |")]
    assert rows and all(f"| {losses} |" in row for row in rows), (
        f"{table.name} is stale: its torch runs should print {losses!r}; rerun "
        "python benchmarks/bench_quickstart.py")
