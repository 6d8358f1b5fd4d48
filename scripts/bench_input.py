"""Throughput of the training input pipeline on Tatoeba English-French.

Reads `<data_dir>/tatoeba_en_fr/fra.txt` (English<TAB>French, read in place), trains a
SentencePiece vocabulary into a temporary folder, builds `trainer.data.train_dataset`
with the default config's batching (or the flags' values), and pulls batches the way the
trainer does: `steps_per_call` of them per call of a `tf.function`, which also counts the
non-padding tokens (source plus target). Reports batches/s, examples/s and tokens/s, and
writes them to benchmarks/input_pipeline.json (`--out`).

Tatoeba's sentences are short (about 8 tokens), so its batches are large (hundreds of
examples): per example, this is the hardest case for the pipeline.

    python -m scripts.bench_input --data_dir=../shared/data
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from scripts import harness  # noqa: E402
from trainer.config import default_config  # noqa: E402
from trainer.data import load_or_train, load_pairs, train_dataset  # noqa: E402

SOURCES = (*harness.PRODUCT, "scripts/bench_input.py")

logger = logging.getLogger("bench_input")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; batching defaults come from trainer/config.py."""
    data = default_config().data
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir", default="../shared/data", help="folder holding tatoeba_en_fr/fra.txt"
    )
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument(
        "--vocab_sentences",
        type=int,
        default=200_000,
        help="sentences (both sides) to train the vocabulary on",
    )
    parser.add_argument("--max_length", type=int, default=data.max_length)
    parser.add_argument("--tokens_per_batch", type=int, default=data.tokens_per_batch)
    parser.add_argument("--shuffle_buffer", type=int, default=data.shuffle_buffer)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps_per_call",
        type=int,
        default=100,
        help="batches per tf.function call, as the trainer's inner loop",
    )
    parser.add_argument(
        "--warmup_calls",
        type=int,
        default=2,
        help="untimed calls first (shuffle buffer fill, tracing)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="timed duration")
    parser.add_argument(
        "--out",
        default="benchmarks/input_pipeline.json",
        help="JSON output path, relative to the repository root",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Trains the vocabulary, times the pipeline, prints and writes the results."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tatoeba = Path(args.data_dir) / "tatoeba_en_fr" / "fra.txt"
    if not tatoeba.is_file():
        sys.exit(f"{tatoeba} does not exist; pass --data_dir=<folder with tatoeba_en_fr/fra.txt>")
    config = default_config().data
    config.source, config.train_files = "text", str(tatoeba)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as vocab_dir:
        start = time.perf_counter()
        tokenizer = load_or_train(
            Path(vocab_dir) / "spm.model",
            load_pairs(config, "train", seed=args.seed),
            vocab_size=args.vocab_size,
            max_sentences=args.vocab_sentences,
            seed=args.seed,
        )
        vocab_seconds = time.perf_counter() - start
        dataset = train_dataset(
            load_pairs(config, "train", seed=args.seed),
            tokenizer,
            max_length=args.max_length,
            tokens_per_batch=args.tokens_per_batch,
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
        )
        results = measure(dataset, args)
    results["vocab_training_seconds"] = vocab_seconds
    harness.write(
        args.out,
        benchmark="input_pipeline",
        sources=SOURCES,
        results={
            "config": {
                "data": str(tatoeba.resolve()),
                "vocab_size": tokenizer.vocab_size,
                **{k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
            },
            # Other processes on the machine slow the pipeline; the load average shows it.
            "load_average": {
                "1/5/15 min before": load_before,
                "1/5/15 min after": os.getloadavg(),
            },
            **results,
        },
        targets={},
        split=None,
    )
    print(
        f"batches/s {results['batches_per_s']:.1f}  examples/s {results['examples_per_s']:.0f}  "
        f"tokens/s {results['tokens_per_s']:.0f} (source+target, no padding)  "
        f"padding {100 * results['padding_fraction']:.1f}%  first batch "
        f"{results['first_batch_seconds']:.2f} s"
    )
    print(f"wrote {args.out}")


def measure(dataset: tf.data.Dataset, args: argparse.Namespace) -> dict:
    """Pulls batches in tf.function calls of `steps_per_call`; returns the rates."""

    @tf.function
    def pull(iterator: tf.data.Iterator, steps: tf.Tensor) -> dict[str, tf.Tensor]:
        tokens = slots = examples = tf.constant(0, tf.int64)
        lengths = tf.TensorArray(tf.int32, size=steps)
        for step in tf.range(steps):
            batch = next(iterator)
            inputs, targets = batch["inputs"], batch["targets"]
            tokens += tf.math.count_nonzero(inputs) + tf.math.count_nonzero(targets)
            slots += tf.size(inputs, tf.int64) + tf.size(targets, tf.int64)
            examples += tf.shape(inputs, tf.int64)[0]
            lengths = lengths.write(step, tf.shape(inputs)[1])
        return {"tokens": tokens, "slots": slots, "examples": examples, "lengths": lengths.stack()}

    iterator = iter(dataset)
    start = time.perf_counter()
    next(iterator)
    first_batch_seconds = time.perf_counter() - start
    steps = tf.constant(args.steps_per_call)
    for _ in range(args.warmup_calls):
        pull(iterator, steps)
    totals: Counter = Counter()
    bucket_batches: Counter = Counter()
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        outcome = pull(iterator, steps)
        calls += 1
        totals.update({name: int(outcome[name]) for name in ("tokens", "slots", "examples")})
        bucket_batches.update(outcome["lengths"].numpy().tolist())
    seconds = time.perf_counter() - start
    batches = calls * args.steps_per_call
    logger.info("%d batches in %.1f s", batches, seconds)
    return {
        "seconds": seconds,
        "batches": batches,
        "batches_per_s": batches / seconds,
        "examples_per_s": totals["examples"] / seconds,
        "tokens_per_s": totals["tokens"] / seconds,
        "padded_tokens_per_s": totals["slots"] / seconds,
        "padding_fraction": 1 - totals["tokens"] / totals["slots"],
        "mean_examples_per_batch": totals["examples"] / batches,
        "batches_per_padded_length": dict(sorted(bucket_batches.items())),
        "first_batch_seconds": first_batch_seconds,
    }


if __name__ == "__main__":
    main()
