"""A WikiText-like corpus of a given size for benchmarks, with a vocabulary that keeps growing.

    python benchmarks/make_corpus.py OUT.tokens --mb 100 [--rename 0.03]

Copies of real WikiText text (the sample shipped with bertlite, and WikiText-2's splits from
``$BERTLITE_DATA/wikitext-2`` or ``/work/shared/data/wikitext-2`` where present), each copy
after the first with a share (``--rename``, 3%) of its distinct words renamed to new words
(``word`` -> ``word<copy in base 36>``), so that the vocabulary grows with the size as in real
text instead of stopping at WikiText-2's. Deterministic; written in 8 MB pieces (memory does not
grow with ``--mb``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources() -> list[Path]:
    found = [ROOT / "bertlite" / "data" / "sample" / "wiki.train.tokens"]
    for folder in (Path(os.environ.get("BERTLITE_DATA", "~/.cache/bertlite")).expanduser()
                   / "wikitext-2", Path("/work/shared/data/wikitext-2")):
        split_files = sorted(folder.glob("wiki.*.tokens"))
        if split_files:
            found += split_files
            break
    return found


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def make_corpus(out: Path, mb: float, rename: float = 0.03, seed: int = 0) -> Path:
    """Write about ``mb`` MB of WikiText-like text to ``out``; returns it."""
    base = "".join(p.read_text(encoding="utf-8") for p in sources())
    lines = base.split("\n")
    words = sorted({w for line in lines for w in line.split() if w.isalpha()})
    target = int(mb * 1e6)
    written = 0
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as f:
        copy = 0
        while written < target:
            if copy == 0:
                text = base
            else:
                chosen = rng.sample(words, max(1, int(rename * len(words))))
                mapping = {w: w + _base36(copy) for w in chosen}
                get = mapping.get
                text = "\n".join(" ".join(get(w, w) for w in line.split(" "))
                                 for line in lines)
            piece = text[:target - written] if written + len(text) > target else text
            if piece is not text:  # end at a line
                piece = piece[:piece.rfind("\n") + 1]
                if not piece:
                    break
            f.write(piece)
            written += len(piece.encode("utf-8"))
            copy += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--rename", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_corpus(Path(args.out), args.mb, args.rename, args.seed)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB from {[p.name for p in sources()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
