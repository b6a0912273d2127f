"""The book's representation study: the same word in different contexts gets different BERT
vectors (polysemy), and <cls> stands for the whole input.

Pretrains a small BERT on the sample corpus shipped with bertlite (which has articles on both
kinds of crane), then prints cosine similarities of the vector of "crane" in the book's two
inputs ("a crane is flying" and the pair "a crane driver came" / "he just left") and in a
further bird and a further machine context, and of the <cls> vectors; and draws a heatmap of
the cosine similarities of all token vectors of the sentences.

    python examples/polysemy.py                       # PyTorch, 100 steps, polysemy.png
    python examples/polysemy.py --backend mxnet --steps 200 --out crane.png

A hundred steps of the book's tiny BERT on 30,000 words teach it little beyond word
frequencies: the numbers show the mechanics (context changes a word's vector), not a good
language model. The learning rate is 0.001 rather than the book's 0.01: at 0.01 a short run
collapses the encoder, every token of every input gets the same vector (cosine 1.0000 below,
spread 0; try ``--lr 0.01``). Raw cosines of an undertrained BERT are all close to 1 (its vectors
share one large component), so a second column compares them with the mean token vector of
these inputs removed ("centered").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import bertlite

#: (label, text A, text B): the book's two inputs first
CONTEXTS = [
    ("flying", "a crane is flying", None),
    ("driver", "a crane driver came", "he just left"),
    ("bird", "a crane can feed on seeds and grain in winter", None),
    ("machine", "the tower crane carried heavy steel on the building site", None),
]
WORD = "crane"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors, clipped to [-1, 1] against rounding."""
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def spread(vectors: np.ndarray) -> float:
    """How much the token vectors of one input differ (mean standard deviation over tokens);
    about 0 when the encoder has collapsed and ignores its input."""
    return float(vectors.std(axis=0).mean())


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def encode_contexts(model: bertlite.Pretrained, contexts=CONTEXTS
                    ) -> list[tuple[str, list[str], np.ndarray]]:
    """``(label, tokens with <cls>/<sep>, encodings (len, hidden))`` of each context."""
    out = []
    for label, text_a, text_b in contexts:
        tokens_a = model.tokenize(text_a)
        tokens_b = model.tokenize(text_b) if text_b else None
        tokens, _ = bertlite.get_tokens_and_segments(tokens_a, tokens_b)
        out.append((label, tokens, model.encode(tokens_a, tokens_b)[0]))
    return out


def draw_heatmap(encoded: list[tuple[str, list[str], np.ndarray]], path: str | Path,
                 title: str) -> Path:
    """Cosine similarities of all token vectors of the contexts, one block per context, with
    their mean vector removed (raw cosines of an undertrained BERT are all about 1)."""
    from matplotlib.figure import Figure  # no pyplot: headless, leaves backends alone

    labels = [t for _, tokens, _ in encoded for t in tokens]
    vectors = np.concatenate([enc for _, _, enc in encoded])
    sims = cosine_matrix(vectors - vectors.mean(axis=0))
    n = len(labels)
    fig = Figure(figsize=(0.22 * n + 2.5, 0.22 * n + 1.5))
    ax = fig.subplots()
    image = ax.imshow(sims, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    edge = -0.5
    for _, tokens, _ in encoded[:-1]:  # lines between the contexts
        edge += len(tokens)
        ax.axhline(edge, color="black", linewidth=0.8)
        ax.axvline(edge, color="black", linewidth=0.8)
    for i, label in enumerate(labels):  # outline the word of interest on the diagonal
        if label == WORD:
            ax.add_patch(_square(i))
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _square(i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="gold", linewidth=1.5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", help="torch (default) or mxnet")
    parser.add_argument("--corpus", default="sample", help="sample (default) or wikitext-2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.001,
                        help="0.001 (default); the book's 0.01 collapses a short run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="tiny", help="tiny (the book's BERT), base, large")
    parser.add_argument("--out", default="polysemy.png", help="the heatmap PNG")
    return parser


def main(argv: Sequence[str] | None = None, *, config=None) -> dict[str, float]:
    """Train, print the similarities, draw the heatmap; returns the printed similarities
    (``config`` overrides ``--config`` with a dict, for quick runs)."""
    args = build_parser().parse_args(argv)
    model = bertlite.train(args.backend, corpus=args.corpus, config=config or args.config,
                           batch_size=args.batch_size, max_len=64, num_steps=args.steps,
                           lr=args.lr, seed=args.seed, plot=None, progress=False)
    encoded = encode_contexts(model)
    vectors = {}
    for label, tokens, enc in encoded:
        vectors[label] = enc[tokens.index(WORD)]
        vectors[f"<cls> {label}"] = enc[0]
    texts = {label: text_a + (f" / {text_b}" if text_b else "")
             for label, text_a, text_b in CONTEXTS}

    mean = np.concatenate([enc for _, _, enc in encoded]).mean(axis=0)
    results: dict[str, float] = {}

    def show(name: str, a: str, b: str) -> None:
        raw = cosine(vectors[a], vectors[b])
        centered = cosine(vectors[a] - mean, vectors[b] - mean)
        results[name], results[f"{name} centered"] = raw, centered
        a, b = a.removeprefix("<cls> "), b.removeprefix("<cls> ")
        print(f'  {raw:+.4f}  {centered:+.4f}  "{texts[a]}"  vs  "{texts[b]}"')

    print(f"\n{model.backend.name}, {args.steps} steps, vocabulary of {len(model.vocab)}; "
          f"spread of the token vectors of the first input {spread(encoded[0][2]):.4f}")
    print(f'cosine similarity of the vectors of "{WORD}" (raw, centered):')
    for a, b in (("flying", "driver"), ("flying", "bird"), ("flying", "machine"),
                 ("driver", "machine"), ("driver", "bird"), ("bird", "machine")):
        show(f"{WORD} {a} vs {b}", a, b)
    print("cosine similarity of the <cls> vectors, the whole input (raw, centered):")
    for a, b in (("flying", "driver"), ("flying", "bird"), ("bird", "machine")):
        show(f"<cls> {a} vs {b}", f"<cls> {a}", f"<cls> {b}")
    path = draw_heatmap(encoded, args.out, f"cosine similarity of token vectors, centered "
                                           f"({model.backend.name}, {args.steps} steps)")
    print(f"heatmap: {path}")
    return results


if __name__ == "__main__":
    main()
