"""The backend-neutral data pipeline: text -> vocabulary -> examples -> batches (numpy)."""

from bertlite.data.corpus import (
    SPECIAL_TOKENS,
    find_split_file,
    get_tokens_and_segments,
    read_wiki,
    resolve_corpus_file,
)
from bertlite.data.examples import PretrainingExamples, build_examples, mask_tokens
from bertlite.data.loader import Batch, BatchIterator, load_data_wiki, prepare_data
from bertlite.data.prepared import PreparedBatches, PreparedData
from bertlite.data.tokenizer import WordPieceTokenizer
from bertlite.data.vocab import Vocab

__all__ = [
    "SPECIAL_TOKENS", "Batch", "BatchIterator", "PreparedBatches", "PreparedData",
    "PretrainingExamples", "Vocab", "build_examples",
    "find_split_file", "get_tokens_and_segments", "load_data_wiki", "mask_tokens",
    "WordPieceTokenizer", "prepare_data", "read_wiki", "resolve_corpus_file",
]
