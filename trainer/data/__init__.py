"""Data: sentence pairs (WMT'14, text files, numbers), the SentencePiece vocabulary, batches."""

from trainer.data.numbers import number_pairs
from trainer.data.pipeline import eval_dataset, train_dataset
from trainer.data.sources import load_pairs
from trainer.data.tokenizer import Tokenizer, load_or_train

__all__ = [
    "Tokenizer",
    "eval_dataset",
    "load_or_train",
    "load_pairs",
    "number_pairs",
    "train_dataset",
]
