"""Evaluation: per-token loss on a split, translation and BLEU.

The `Evaluator` serves the training loop (dev loss and BLEU on a subset during
training, dev and test at the end) and `python -m trainer.translate`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from trainer.data import pipeline, sources
from trainer.data.tokenizer import Tokenizer
from trainer.model import bleu, decode, transformer

log = logging.getLogger(__name__)

# (source, hypothesis, reference) triples shown in TensorBoard per evaluation.
SHOWN_EXAMPLES = 4


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation of a split.

    Attributes:
        loss: Mean cross entropy per target token (no label smoothing), nats.
        accuracy: Share of target tokens predicted right under teacher forcing.
        bleu: sacreBLEU corpus score of the translated sentences.
        bleu_sentences: How many sentences were translated for BLEU.
        examples: A few (source, hypothesis, reference) triples.
    """

    loss: float
    accuracy: float
    bleu: float
    bleu_sentences: int
    examples: tuple[tuple[str, str, str], ...]


class Evaluator:
    """Computes loss and BLEU of `model` on the splits of `config.data`.

    Args:
        model: The Transformer.
        tokenizer: Its SentencePiece tokenizer.
        config: The run's config (data, decode and model fields are used).
    """

    def __init__(self, model: keras.Model, tokenizer: Tokenizer, config: ml_collections.ConfigDict):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._datasets: dict[str, tf.data.Dataset] = {}
        spec = tf.TensorSpec([None, None], tf.int32)
        self._translate_ids = tf.function(
            lambda inputs: decode.translate_batch(model, inputs, config.decode),
            input_signature=[spec],
        )
        self._batch_loss = tf.function(self._loss_sums, input_signature=[spec, spec])

    def has_split(self, split: str) -> bool:
        """Whether the data source has `split` ("dev" or "test")."""
        data = self.config.data
        if data.source != "text":
            return True
        if data.split_file:
            return split != "test" or data.split_test_size > 0
        return bool(data[f"{split}_files"])

    def _dataset(self, split: str) -> tf.data.Dataset:
        if split not in self._datasets:
            self._datasets[split] = pipeline.eval_dataset(
                sources.load_pairs(self.config.data, split, seed=self.config.seed),
                self.tokenizer,
                batch_size=self.config.data.eval_batch_size,
                max_length=self.config.data.max_eval_length,
            )
        return self._datasets[split]

    def _loss_sums(
        self, inputs: tf.Tensor, targets: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        logits = self.model({"inputs": inputs, "targets": targets}, training=False)
        loss_sum, weight_sum = transformer.sequence_loss(logits, targets, 0.0)
        correct, _ = transformer.token_accuracy(logits, targets)
        return loss_sum, weight_sum, correct

    def _batch_losses(self, split: str) -> Iterator[tuple[dict[str, tf.Tensor], np.ndarray]]:
        """Yields each batch of `split` with its (loss sum, weight sum, correct tokens)."""
        for batch in self._dataset(split):
            sums = self._batch_loss(batch["inputs"], batch["targets"])
            yield batch, np.array([float(value) for value in sums])

    def loss(self, split: str) -> tuple[float, float]:
        """Loss per target token and token accuracy over the whole split, no decoding."""
        totals = np.zeros(3)
        for _, sums in self._batch_losses(split):
            totals += sums
        loss_sum, weight_sum, correct = totals
        if not weight_sum:
            raise ValueError(f"the {split} split of config.data.source is empty")
        return float(loss_sum / weight_sum), float(correct / weight_sum)

    def evaluate(self, split: str, max_bleu_examples: int | None = None) -> EvalResult:
        """Loss over the whole split and BLEU over its first sentences.

        Args:
            split: "dev" or "test".
            max_bleu_examples: Sentences to translate; None uses
                `config.data.eval_bleu_examples`, 0 translates all of them.
        """
        if max_bleu_examples is None:
            max_bleu_examples = self.config.data.eval_bleu_examples
        totals = np.zeros(3)
        hypotheses: list[str] = []
        references: list[str] = []
        source_texts: list[str] = []
        for batch, sums in self._batch_losses(split):
            totals += sums
            wanted = (max_bleu_examples or np.inf) - len(hypotheses)
            if wanted > 0:
                count = int(min(wanted, batch["inputs"].shape[0]))
                ids = self._translate_ids(batch["inputs"][:count]).numpy()
                hypotheses.extend(self.tokenizer.decode_batch(ids))
                references.extend(_texts(batch["target_text"][:count]))
                source_texts.extend(_texts(batch["source_text"][:count]))
        loss_sum, weight_sum, correct = totals
        if not weight_sum:
            raise ValueError(f"the {split} split of config.data.source is empty")
        score = bleu.corpus_bleu(hypotheses, references) if hypotheses else 0.0
        shown = tuple(zip(source_texts, hypotheses, references))[:SHOWN_EXAMPLES]
        return EvalResult(
            loss_sum / weight_sum, correct / weight_sum, score, len(hypotheses), shown
        )

    def translate(self, texts: list[str]) -> list[str]:
        """Translates `texts` (one sentence each), in batches of `data.eval_batch_size`."""
        outputs: list[str] = []
        batch_size = self.config.data.eval_batch_size
        max_length = self.config.data.max_eval_length
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer.encode(texts[start : start + batch_size])
            width = max(1, max(min(len(ids), max_length) for ids in encoded))
            inputs = np.zeros((len(encoded), width), np.int32)
            for row, ids in enumerate(encoded):
                ids = ids[: max_length - 1] + [ids[-1]] if len(ids) > max_length else ids
                inputs[row, : len(ids)] = ids
            outputs.extend(self.tokenizer.decode_batch(self._translate_ids(inputs).numpy()))
        return outputs


def _texts(strings: tf.Tensor) -> list[str]:
    return [s.decode("utf-8") for s in strings.numpy()]
