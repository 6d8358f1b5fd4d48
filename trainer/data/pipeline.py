"""Sentence pairs to model batches: tokenized, length-bucketed training batches and eval batches.

Training batches hold at most `tokens_per_batch` tokens per side, padding included:
examples are grouped by length into buckets whose padded lengths grow geometrically (8, 12,
16, 24, 32, ... max_length), and a bucket of padded length L is batched
`tokens_per_batch // L` examples at a time (what `tf.data`'s `bucket_by_sequence_length`
does with `pad_to_bucket_boundary=True`). All batches have the element spec [None, None],
so that one trace of the training step serves every bucket.

Throughput: TensorFlow ops run on single examples cost tens of microseconds each on a
small CPU host, so all the work is done on chunks of `_ENCODE_BATCH` pairs (tokenizing,
dropping long pairs, choosing each example's bucket); per example, only the shuffle, the
unbatching and the grouping remain. The pairs are shuffled as strings, before tokenizing:
the buffer is smaller that way, in memory and in checkpoints.

The training iterator can be checkpointed with `tf.train.Checkpoint(iterator=iter(ds))`,
and a restored iterator continues with the batch the saved one would have given next. The
tokenizer runs as a *stateless* `tf.numpy_function` (see `Tokenizer.tf_encode`); a
stateful one would make `tf.data` refuse to save the iterator. Saved are the read
positions, the shuffle buffer and the buckets' partial batches.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from trainer.data.tokenizer import EOS_ID, PAD_ID, Tokenizer

# Pairs per call of SentencePiece's batch encoder and of the ops that follow it.
_ENCODE_BATCH = 1024
# Smallest padded length of a training bucket.
_SMALLEST_BUCKET = 8


def bucket_lengths(max_length: int) -> list[int]:
    """The padded lengths of the training buckets: 8, 12, 16, 24, 32, ..., max_length.

    Args:
        max_length: The longest example (in tokens, EOS included); always the last length.

    Returns:
        Increasing lengths; lengths of the form 2^k and 1.5 * 2^k below max_length, then
        max_length.
    """
    lengths, power = [], _SMALLEST_BUCKET
    while power < max_length:
        lengths += [length for length in (power, power * 3 // 2) if length < max_length]
        power *= 2
    return lengths + [max_length]


def train_dataset(
    pairs: tf.data.Dataset,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    tokens_per_batch: int,
    shuffle_buffer: int,
    seed: int,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Shuffled, tokenized, filtered and length-bucketed training batches.

    Args:
        pairs: `{"source", "target"}` string pairs (`load_pairs(..., "train")`).
        tokenizer: Encodes both sides; every sequence ends with EOS.
        max_length: Pairs with more tokens than this on either side (EOS included) are
            dropped (config.data.max_length).
        tokens_per_batch: Most tokens of one side of a batch, padding included: a batch of
            padded length L holds `tokens_per_batch // L` examples.
        shuffle_buffer: Pairs in the shuffle buffer.
        seed: Seed of the shuffle; the same seed gives the same batches.
        repeat: Repeat the data forever (each pass reshuffled); False gives one pass, with
            each bucket's last partial batch dropped.

    Returns:
        A dataset of `{"inputs": int32 [B, L], "targets": int32 [B, L]}`, padded with 0,
        where L is one of `bucket_lengths(max_length)` and B is `tokens_per_batch // L`.

    Raises:
        ValueError: If a batch could not hold one example of `max_length` tokens.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if tokens_per_batch < max_length:
        raise ValueError(
            f"tokens_per_batch must hold one example of max_length={max_length} tokens, got "
            f"{tokens_per_batch}; raise config.data.tokens_per_batch"
        )
    lengths = bucket_lengths(max_length)
    padded_lengths = tf.constant(lengths, tf.int64)
    batch_sizes = tf.constant([tokens_per_batch // length for length in lengths], tf.int64)

    pairs = pairs.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        pairs = pairs.repeat()
    encode = _bucketed_encoder(tokenizer, max_length, padded_lengths)
    examples = pairs.batch(_ENCODE_BATCH).map(encode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    batches = examples.group_by_window(
        key_func=lambda example: example["bucket"],
        reduce_func=_bucket_batcher(padded_lengths, batch_sizes),
        window_size_func=lambda bucket: batch_sizes[bucket],
    )
    return batches.prefetch(tf.data.AUTOTUNE)


def _bucketed_encoder(
    tokenizer: Tokenizer, max_length: int, padded_lengths: tf.Tensor
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Encodes string pairs, drops those over `max_length`, and names each one's bucket."""

    def encode(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = tokenizer.tf_encode(batch["source"])
        targets = tokenizer.tf_encode(batch["target"])
        length = tf.maximum(inputs.row_lengths(), targets.row_lengths())
        keep = length <= max_length
        # Padded to max_length here, cut to the bucket's length once batched.
        shape = [None, max_length]
        return {
            "inputs": tf.ragged.boolean_mask(inputs, keep).to_tensor(PAD_ID, shape=shape),
            "targets": tf.ragged.boolean_mask(targets, keep).to_tensor(PAD_ID, shape=shape),
            # The shortest padded length that holds the example.
            "bucket": tf.searchsorted(
                padded_lengths, tf.boolean_mask(length, keep), out_type=tf.int64
            ),
        }

    return encode


def _bucket_batcher(
    padded_lengths: tf.Tensor, batch_sizes: tf.Tensor
) -> Callable[[tf.Tensor, tf.data.Dataset], tf.data.Dataset]:
    """Batches one bucket's examples, cut to the bucket's padded length."""

    def batch_bucket(bucket: tf.Tensor, examples: tf.data.Dataset) -> tf.data.Dataset:
        length = padded_lengths[bucket]
        batches = examples.batch(batch_sizes[bucket], drop_remainder=True)
        return batches.map(
            lambda batch: {
                "inputs": batch["inputs"][:, :length],
                "targets": batch["targets"][:, :length],
            }
        )

    return batch_bucket


def eval_dataset(
    pairs: tf.data.Dataset, tokenizer: Tokenizer, *, batch_size: int, max_length: int
) -> tf.data.Dataset:
    """Evaluation batches in the order of `pairs`, none dropped.

    Args:
        pairs: `{"source", "target"}` string pairs (`load_pairs(..., "dev")`).
        tokenizer: Encodes both sides; every sequence ends with EOS.
        batch_size: Pairs per batch; the last batch may be smaller.
        max_length: Longer token sequences (both sides) are cut to this length, their last
            token replaced by EOS (config.data.max_eval_length). BLEU should be computed
            against "target_text", which is never cut.

    Returns:
        A dataset of `{"inputs": int32 [B, S], "targets": int32 [B, T], "source_text":
        string [B], "target_text": string [B]}`, the ids padded with 0 to the longest
        sequence of the batch.

    Raises:
        ValueError: If `batch_size` or `max_length` is not positive.
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    def encode(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {
            "inputs": _cut(tokenizer.tf_encode(batch["source"]), max_length).to_tensor(PAD_ID),
            "targets": _cut(tokenizer.tf_encode(batch["target"]), max_length).to_tensor(PAD_ID),
            "source_text": batch["source"],
            "target_text": batch["target"],
        }

    batches = pairs.batch(batch_size).map(encode, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


def _cut(ids: tf.RaggedTensor, max_length: int) -> tf.RaggedTensor:
    """Cuts rows longer than `max_length` to their first max_length - 1 ids plus EOS."""
    body = ids[:, :-1][:, : max_length - 1]  # Each row ends with EOS: drop it, cut.
    eos = tf.fill([ids.nrows(), 1], tf.constant(EOS_ID, ids.dtype))
    return tf.concat([body, eos], axis=1)
