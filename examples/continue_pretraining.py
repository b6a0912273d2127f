"""Continue pretraining a published BERT on your own corpus (domain adaptation), then use it with
``transformers``: import a local ``transformers`` BERT folder, run more MLM + NSP steps on the
sample corpus in one backend, export the result as a ``BertForPreTraining`` folder and fill in a
masked word with ``transformers``' fill-mask pipeline.

    # a BERT you downloaded (save_pretrained / `hf download bert-base-uncased --local-dir bert`)
    python examples/continue_pretraining.py bert --backend torch --steps 20 --out bert-domain
    # no download: a tiny random BERT built locally first
    python examples/continue_pretraining.py --tiny tiny-bert --steps 5 --out tiny-domain

Needs ``pip install "bertlite[hf]"`` (``transformers``); nothing is read from the network.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import bertlite

SENTENCE = "the crane is {mask} over the river"


def make_tiny_bert(folder: str | Path, seed: int = 0) -> Path:
    """A random 2-layer ``BertForPreTraining`` with a WordPiece tokenizer trained on the sample
    corpus, saved with ``save_pretrained`` (what a downloaded BERT folder looks like)."""
    import torch
    import transformers

    from bertlite.data.corpus import read_wiki, resolve_corpus_file
    from bertlite.data.tokenizer import WordPieceTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = read_wiki(resolve_corpus_file("sample", "train"))
    pieces = WordPieceTokenizer.train([s for p in paragraphs for s in p], vocab_size=2000)
    bert_names = {"<pad>": "[PAD]", "<unk>": "[UNK]", "<cls>": "[CLS]", "<sep>": "[SEP]",
                  "<mask>": "[MASK]"}
    tokens = [bert_names.get(t, t) for t in pieces.idx_to_token]
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder, do_lower_case=True)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=128)
    transformers.BertForPreTraining(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a local transformers BERT folder")
    parser.add_argument("--tiny", help="first build a tiny random BERT in this folder, use it")
    parser.add_argument("--backend", default="torch", help="torch or mxnet")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="bert-continued", help="folder for the result")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.tiny is None):
        parser.error("give a transformers folder, or --tiny FOLDER to build one")
    folder = make_tiny_bert(args.tiny) if args.tiny else Path(args.folder)

    result = bertlite.train(args.backend, corpus="sample", init=folder, num_steps=args.steps,
                            batch_size=args.batch_size, max_len=args.max_len, lr=args.lr,
                            optimizer="adamw", plot=None)
    out = result.to_hf(args.out)
    print(f"exported: {out}")

    import transformers

    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    text = SENTENCE.format(mask=fill.tokenizer.mask_token)
    predictions = [(p["token_str"], float(p["score"])) for p in fill(text, top_k=5)]
    print(text)
    for token, score in predictions:
        print(f"  {token:>12}  {score:.3f}")
    return predictions


if __name__ == "__main__":
    main()
