"""The book's BERT pretraining run through bertlite, for either backend: 50 steps, batch 512,
max_len 64, the tiny BERT, Adam at lr 0.01; then the encodings of "a crane is flying" and of the
pair "a crane driver came" / "he just left" (see pretrain_torch.py, pretrain_mxnet.py)."""

import argparse

import bertlite


def main(backend: str, devices_help: str) -> None:
    parser = argparse.ArgumentParser(description=f"The book's BERT pretraining on {backend}.")
    parser.add_argument("--corpus", default="wikitext-2",
                        help="wikitext-2 (downloaded if absent) or sample (shipped)")
    parser.add_argument("--data-dir", help="folder with wiki.train.tokens")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--devices", help=devices_help)
    args = parser.parse_args()

    plot = f"bert_pretraining_{backend}.png"
    result = bertlite.train(backend=backend, corpus=args.corpus, data_dir=args.data_dir,
                            config="tiny", batch_size=512, max_len=64, num_steps=args.steps,
                            lr=0.01, devices=args.devices, plot=plot)
    print(f"loss plot: {plot}")

    # Representing text with BERT: <cls> (index 0) stands for the whole input.
    encoded_text = bertlite.get_bert_encoding(result, ["a", "crane", "is", "flying"])
    print("text:", encoded_text.shape, encoded_text[:, 0, :].shape, encoded_text[:, 2, :][0][:3])
    encoded_pair = bertlite.get_bert_encoding(result, ["a", "crane", "driver", "came"],
                                              ["he", "just", "left"])
    print("pair:", encoded_pair.shape, encoded_pair[:, 0, :].shape, encoded_pair[:, 2, :][0][:3])
