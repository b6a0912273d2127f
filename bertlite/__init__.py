"""bertlite: BERT pretraining (masked language modeling + next sentence prediction) with one
backend-neutral core and PyTorch and MXNet backends.

Importing bertlite imports no framework; a backend's framework is imported when it is used.
"""

from bertlite._version import __version__
from bertlite.api import OutputError, TrainResult, info, train
from bertlite.checkpoint import load, save
from bertlite.config import BERTConfig
from bertlite.data import Vocab, get_tokens_and_segments, load_data_wiki
from bertlite.data.prepare import prepare
from bertlite.evaluate import evaluate
from bertlite.hf import export_hf, from_hf
from bertlite.memory import estimate_memory
from bertlite.model import Pretrained, get_bert_encoding
from bertlite.options import OptionError
from bertlite.registry import available_backends, get_backend
from bertlite.signals import TrainingInterrupted

__all__ = [
    "BERTConfig", "OptionError", "OutputError", "Pretrained", "TrainResult", "TrainingInterrupted",
    "Vocab", "__version__", "available_backends", "estimate_memory", "evaluate", "export_hf",
    "from_hf", "get_backend", "get_bert_encoding", "get_tokens_and_segments", "info", "load",
    "load_data_wiki", "prepare", "save", "train",
]
