"""The Transformer translation model, its decoding (greedy and beam search) and BLEU."""

from trainer.model.bleu import bleu_signature, corpus_bleu
from trainer.model.decode import beam_search, decode_length, greedy_decode, translate_batch
from trainer.model.transformer import (
    EOS_ID,
    PAD_ID,
    Transformer,
    build_transformer,
    sequence_loss,
    token_accuracy,
)

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "Transformer",
    "beam_search",
    "bleu_signature",
    "build_transformer",
    "corpus_bleu",
    "decode_length",
    "greedy_decode",
    "sequence_loss",
    "token_accuracy",
    "translate_batch",
]
