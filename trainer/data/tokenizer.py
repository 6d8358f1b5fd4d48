"""The joint source/target subword vocabulary: a SentencePiece unigram model.

Ids: 0 is padding, 1 is end of sentence (EOS, appended to every encoded sentence),
2 is unknown; there is no beginning-of-sentence id. `Tokenizer.tf_encode` runs
SentencePiece's C++ batch encoder from inside a TensorFlow graph, so that `tf.data`
pipelines can tokenize on the fly.

A `tf.data` thread that calls into Python while the interpreter shuts down hangs or
aborts the process (TensorFlow issue #21277), which happens when a script ends while an
iterator is still filling its buffers. `_ExitGate` closes that window: at exit, before
the interpreter finalizes, it makes further calls fail fast and waits for the running
ones, so the producers come to rest before finalization starts.
"""

from __future__ import annotations

import atexit
import io
import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import tensorflow as tf

logger = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Sentences between two progress lines while collecting the vocabulary's training text.
_LOG_EVERY_SENTENCES = 200_000


class VocabularyError(ValueError):
    """No SentencePiece model can be trained on this text with these settings."""


def _last_line(error: BaseException) -> str:
    """SentencePiece's reason, without the C++ source location before it."""
    return str(error).strip().splitlines()[-1].rsplit("]", 1)[-1].strip()


class _ExitGate:
    """Counts the running `tf_encode` calls; at interpreter exit, refuses new ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False
        self._last_attempt = 0.0

    def enter(self) -> None:
        """Called before a call's work; raises once the interpreter is exiting."""
        with self._lock:
            self._last_attempt = time.monotonic()
            if self._closed:
                # Fails the tf.data element; nobody reads it any more.
                raise RuntimeError("the Python interpreter is exiting")
            self._running += 1

    def leave(self) -> None:
        with self._lock:
            self._running -= 1

    def close(self, quiet_s: float = 0.2, timeout_s: float = 5.0) -> None:
        """Refuses new calls, then waits until none runs and none was tried for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closed = True
        while time.monotonic() < deadline:
            with self._lock:
                if self._running == 0 and time.monotonic() - self._last_attempt > quiet_s:
                    return
            time.sleep(0.02)


_EXIT_GATE = _ExitGate()
atexit.register(_EXIT_GATE.close)


class Tokenizer:
    """Encodes text to ids and back with a SentencePiece model (pad 0, EOS 1, unk 2)."""

    def __init__(self, model_proto: bytes, path: str | os.PathLike | None = None) -> None:
        """Wraps a serialized SentencePiece model.

        Args:
            model_proto: The model file's bytes.
            path: The model file it came from, if any (kept as `self.path`).

        Raises:
            ValueError: If the model's special ids are not pad 0, EOS 1, unk 2, no BOS.
        """
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = None if path is None else Path(path)
        ids = (
            self._processor.pad_id(),
            self._processor.eos_id(),
            self._processor.unk_id(),
            self._processor.bos_id(),
        )
        if ids != (PAD_ID, EOS_ID, UNK_ID, -1):
            raise ValueError(
                f"SentencePiece model {self.path or '<bytes>'} has (pad, eos, unk, bos) ids {ids}, "
                f"expected ({PAD_ID}, {EOS_ID}, {UNK_ID}, -1); train it with Tokenizer.train"
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a model file written by `Tokenizer.train`.

        Raises:
            FileNotFoundError: If `path` does not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist")
        return cls(path.read_bytes(), path)

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        path: str | os.PathLike,
        vocab_size: int,
        *,
        num_threads: int | None = None,
        max_sentence_length: int = 4096,
    ) -> Tokenizer:
        """Trains a unigram model on `sentences` and writes it to `path`.

        The model file is written to a temporary file beside `path`, then renamed, so that
        a reader never sees half a file. Where the text is too small for `vocab_size`
        pieces, training is retried with a soft limit and the vocabulary comes out
        smaller (logged as a warning): check `vocab_size` of the result.

        Args:
            sentences: Training text, one sentence per item (source and target mixed).
            path: The model file to write; its folder is created.
            vocab_size: Pieces in the vocabulary, the three special ids included.
            num_threads: SentencePiece trainer threads; None uses all cores.
            max_sentence_length: Longer sentences (in bytes) are skipped by the trainer.

        Returns:
            The trained tokenizer.

        Raises:
            VocabularyError: If there is no text, or `vocab_size` cannot even hold the
                text's distinct characters.
        """
        sentences = list(sentences)
        if not sentences:
            raise VocabularyError(
                f"no sentences to train the SentencePiece model {path} on: the training data "
                "is empty (config.data)"
            )
        path = Path(path)
        options = dict(
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # SentencePiece's own INFO lines would flood the console.
        )
        start = time.monotonic()
        model = _train_model_or_smaller(sentences, options)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, delete=False) as tmp:
            tmp.write(model)
        os.replace(tmp.name, path)
        tokenizer = cls(model, path)
        logger.info(
            "trained a %d-piece SentencePiece model on %d sentences in %.1f s: %s",
            tokenizer.vocab_size,
            len(sentences),
            time.monotonic() - start,
            path,
        )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, the special ones included."""
        return self._processor.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes sentences to ids, each ending with EOS."""
        return self._processor.encode(list(texts), out_type=int, add_eos=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes one sentence: stops at the first EOS and drops padding."""
        pieces = []
        for token in np.asarray(ids).tolist():
            if token == EOS_ID:
                break
            if token != PAD_ID:
                pieces.append(token)
        return self._processor.decode(pieces)

    def decode_batch(self, ids: Iterable[Iterable[int]]) -> list[str]:
        """Decodes each row of `ids` (a padded array or a list of lists) as `decode` does."""
        return [self.decode(row) for row in ids]

    def tf_encode(self, strings: tf.Tensor) -> tf.RaggedTensor:
        """Encodes a batch of sentences inside a TensorFlow graph (e.g. a `tf.data` map).

        The encoder runs as a stateless `tf.numpy_function` (a pure function of its
        input), so that `tf.data` iterators using it can be checkpointed.

        Args:
            strings: A string tensor of shape [N], UTF-8.

        Returns:
            An int32 RaggedTensor of shape [N, None], each row ending with EOS.
        """
        flat, lengths = tf.numpy_function(
            self._encode_flat, [strings], (tf.int32, tf.int64), stateful=False
        )
        flat.set_shape([None])
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(flat, lengths, validate=False)

    def _encode_flat(self, strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NumPy side of `tf_encode`: all ids concatenated, and each sentence's length."""
        _EXIT_GATE.enter()
        try:
            ids = self._processor.encode(strings.tolist(), out_type=int, add_eos=True)
        finally:
            _EXIT_GATE.leave()
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())
        )
        return flat, lengths


def _train_model_or_smaller(sentences: list[str], options: dict[str, Any]) -> bytes:
    """`_train_model`, retried with a soft vocabulary limit where the text is too small.

    Raises:
        VocabularyError: If `vocab_size` cannot even hold the text's distinct characters.
    """
    try:
        return _train_model(sentences, options)
    except RuntimeError as error:
        if "Vocabulary size is smaller than required_chars" in str(error):
            raise VocabularyError(
                f"config.data.vocab_size={options['vocab_size']} cannot hold the distinct "
                f"characters of the training text (SentencePiece: {_last_line(error)}); raise "
                "config.data.vocab_size"
            ) from error
        if "Vocabulary size too high" not in str(error):
            raise
        logger.warning(
            "%d sentences are too few for %d pieces (%s); retrying with a soft limit",
            len(sentences),
            options["vocab_size"],
            _last_line(error),
        )
        return _train_model(sentences, dict(options, hard_vocab_limit=False))


def _train_model(sentences: list[str], options: dict) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    return model.getvalue()


def load_or_train(
    path: str | os.PathLike,
    pairs: tf.data.Dataset,
    vocab_size: int,
    max_sentences: int,
    *,
    shuffle_buffer: int = 100_000,
    seed: int = 0,
) -> Tokenizer:
    """Reuses the model at `path`, or trains one there on the training pairs.

    Args:
        path: The model file (config.data.vocab_path).
        pairs: Training pairs, dicts of "source" and "target" strings (`load_pairs`).
        vocab_size: Pieces to train (config.data.vocab_size); ignored when reusing.
        max_sentences: Sentences to train on, source and target each counting one
            (config.data.vocab_train_sentences).
        shuffle_buffer: The pairs pass a shuffle buffer of this many pairs first, so
            that a file sorted by length or topic does not bias the sample.
        seed: Seed of that shuffle.

    Returns:
        The tokenizer.
    """
    path = Path(path)
    if path.is_file():
        tokenizer = Tokenizer.load(path)
        logger.info(
            "reusing the %d-piece SentencePiece model %s (delete it to train a new one)",
            tokenizer.vocab_size,
            path,
        )
        return tokenizer
    logger.info(
        "no SentencePiece model at %s: training %d pieces on up to %d sentences",
        path,
        vocab_size,
        max_sentences,
    )
    sample = _sentences(pairs.shuffle(shuffle_buffer, seed=seed), max_sentences)
    return Tokenizer.train(sample, path, vocab_size)


def _sentences(pairs: tf.data.Dataset, max_sentences: int) -> Iterator[str]:
    """Yields source and target sentences of `pairs`, at most `max_sentences` in all."""
    count = 0
    for batch in pairs.batch(1024).prefetch(2).as_numpy_iterator():
        for source, target in zip(batch["source"], batch["target"]):
            for sentence in (source, target):
                if count == max_sentences:
                    return
                yield sentence.decode("utf-8")
                count += 1
                if count % _LOG_EVERY_SENTENCES == 0:
                    logger.info("collected %d of up to %d sentences", count, max_sentences)
    logger.info("collected %d sentences (all the training pairs)", count)
