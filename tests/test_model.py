"""Tests of the Transformer: shapes, masking, variable layout, loss and mixed precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import default_config
from trainer.model.transformer import (
    EOS_ID,
    PAD_ID,
    Transformer,
    build_transformer,
    sequence_loss,
    token_accuracy,
)
from trainer.optimizers.shampoo import key_paths

VOCAB_SIZE = 50
NUM_LAYERS = 2
D_MODEL = 32


def tiny_config(**overrides):
    config = default_config().model
    config.num_layers = NUM_LAYERS
    config.d_model = D_MODEL
    config.num_heads = 4
    config.d_ff = 64
    config.max_length = 32
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def model() -> Transformer:
    keras.utils.set_random_seed(0)
    return build_transformer(tiny_config(), VOCAB_SIZE)


def random_ids(rng: np.random.Generator, lengths: list[int], width: int) -> np.ndarray:
    """Rows of random tokens (ids >= 2) of the given lengths, ending in EOS, padded with 0."""
    ids = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = rng.integers(2, VOCAB_SIZE, length - 1)
        ids[row, length - 1] = EOS_ID
    return ids


def test_logits_shape_dtype_and_dropout(model):
    rng = np.random.default_rng(1)
    batch = {"inputs": random_ids(rng, [5, 3], 6), "targets": random_ids(rng, [7, 4], 7)}
    logits = model(batch)
    assert logits.shape == (2, 7, VOCAB_SIZE)
    assert logits.dtype == tf.float32
    np.testing.assert_array_equal(model(batch), logits)  # inference is deterministic
    assert not np.allclose(model(batch, training=True), logits)  # dropout is on in training


def test_variable_layout_for_shampoo(model):
    variables = model.trainable_variables
    # Embedding; per encoder layer 2 LayerNorms (2 each), 4 attention kernels, FFN 2 kernels
    # and 2 biases; per decoder layer one more LayerNorm and 4 more kernels; 2 final norms.
    assert len(variables) == 1 + NUM_LAYERS * (4 + 4 + 4) + NUM_LAYERS * (6 + 8 + 4) + 2 + 2
    embeddings = [v for v in variables if VOCAB_SIZE in v.shape]
    assert [v.path for v in embeddings] == ["transformer/embedding/embeddings"]
    kernels = [v for v in variables if "attention/" in v.path or "feed_forward/" in v.path]
    kernels = [v for v in kernels if v.path.endswith("kernel")]
    assert len(kernels) == NUM_LAYERS * (4 + 2) + NUM_LAYERS * (8 + 2)
    assert all(len(v.shape) == 2 for v in kernels)
    paths = key_paths(variables)
    assert len(set(paths)) == len(paths)
    assert "encoder/layer_0/self_attention/query/kernel" in paths
    assert "decoder/layer_1/cross_attention/output/kernel" in paths
    assert "decoder/layer_1/feed_forward/intermediate/kernel" in paths


def test_variable_paths_are_deterministic(model):
    # A second model in the same process gets the same paths, seed states included.
    keras.utils.set_random_seed(0)
    again = build_transformer(tiny_config(), VOCAB_SIZE)
    assert [v.path for v in again.variables] == [v.path for v in model.variables]
    assert all(v.path.startswith("transformer/") for v in model.variables)


def test_padding_does_not_change_real_positions(model):
    rng = np.random.default_rng(2)
    inputs = random_ids(rng, [6, 3, 5], 6)
    targets = random_ids(rng, [4, 7, 2], 7)
    logits = model({"inputs": inputs, "targets": targets}).numpy()
    padded = {
        "inputs": np.pad(inputs, [[0, 0], [0, 5]]),
        "targets": np.pad(targets, [[0, 0], [0, 3]]),
    }
    padded_logits = model(padded).numpy()
    real = targets != PAD_ID
    np.testing.assert_allclose(padded_logits[:, :7][real], logits[real], atol=1e-5)
    # Each row alone, without the padding its batch gave it, matches too.
    for row in range(3):
        source_length = int(np.sum(inputs[row] != PAD_ID))
        target_length = int(np.sum(real[row]))
        alone = model(
            {
                "inputs": inputs[row : row + 1, :source_length],
                "targets": targets[row : row + 1, :target_length],
            }
        ).numpy()
        np.testing.assert_allclose(alone[0], logits[row, :target_length], atol=1e-5)


def test_decoder_is_causal(model):
    rng = np.random.default_rng(3)
    inputs = random_ids(rng, [5, 5], 5)
    targets = random_ids(rng, [8, 8], 8)
    changed = targets.copy()
    changed[:, 4] = (changed[:, 4] + 1 - 2) % (VOCAB_SIZE - 2) + 2
    logits = model({"inputs": inputs, "targets": targets}).numpy()
    changed_logits = model({"inputs": inputs, "targets": changed}).numpy()
    # Target 4 is the decoder's input at position 5: positions <= 4 cannot see it.
    np.testing.assert_allclose(changed_logits[:, :5], logits[:, :5], atol=1e-6)
    assert np.abs(changed_logits[:, 5] - logits[:, 5]).max() > 1e-3


def test_source_padding_is_masked_in_cross_attention(model):
    # Trailing source padding changes nothing; a real source token does.
    rng = np.random.default_rng(4)
    inputs = random_ids(rng, [4], 6)
    targets = random_ids(rng, [5], 5)
    full = model({"inputs": inputs, "targets": targets}).numpy()
    trimmed = model({"inputs": inputs[:, :4], "targets": targets}).numpy()
    np.testing.assert_allclose(full, trimmed, atol=1e-5)
    other = inputs.copy()
    other[0, 1] = (other[0, 1] - 2 + 1) % (VOCAB_SIZE - 2) + 2
    assert np.abs(model({"inputs": other, "targets": targets}).numpy() - full).max() > 1e-3


def test_too_long_sequences_are_rejected(model):
    too_long = np.ones((1, 33), np.int32)
    with pytest.raises(ValueError, match="max_length 32"):
        model({"inputs": too_long, "targets": too_long[:, :4]})


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="divisible by num_heads, got 30 and 4"):
        build_transformer(tiny_config(d_model=30), VOCAB_SIZE)
    with pytest.raises(ValueError, match="attention_dropout must be in"):
        build_transformer(tiny_config(attention_dropout=1.0), VOCAB_SIZE)


def smoothed_kl(logits: np.ndarray, targets: np.ndarray, smoothing: float) -> np.ndarray:
    """KL(q || softmax(logits)) per token, q the label-smoothed target, in float64 NumPy."""
    vocab = logits.shape[-1]
    q = np.full(logits.shape, smoothing / (vocab - 1))
    np.put_along_axis(q, targets[..., None], 1.0 - smoothing, axis=-1)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    q_log_q = np.where(q > 0, q * np.log(np.maximum(q, 1e-30)), 0.0)
    return np.sum(q_log_q - q * log_p, axis=-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sequence_loss_is_smoothed_kl_over_real_tokens(smoothing):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float64)
    targets = np.array([[3, 4, 1, 0], [2, 1, 0, 0]], np.int32)
    loss_sum, weight_sum = sequence_loss(tf.constant(logits, tf.float32), targets, smoothing)
    real = targets != PAD_ID
    expected = smoothed_kl(logits, targets, smoothing)[real].sum()
    assert weight_sum.dtype == tf.float32 and float(weight_sum) == 5.0
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
    # Logits at padded positions contribute nothing.
    noisy = logits + np.where(real, 0.0, 100.0)[..., None] * rng.normal(size=logits.shape)
    noisy_sum, _ = sequence_loss(tf.constant(noisy, tf.float32), targets, smoothing)
    np.testing.assert_allclose(float(noisy_sum), float(loss_sum), rtol=1e-6)


def test_sequence_loss_of_the_smoothed_distribution_is_zero():
    targets = np.array([[2, 5, 1]], np.int32)
    smoothing, vocab = 0.1, 8
    q = np.full((1, 3, vocab), smoothing / (vocab - 1))
    np.put_along_axis(q, targets[..., None], 1.0 - smoothing, axis=-1)
    loss_sum, weight_sum = sequence_loss(tf.constant(np.log(q), tf.float32), targets, smoothing)
    assert abs(float(loss_sum)) < 1e-5
    assert float(weight_sum) == 3.0
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        sequence_loss(tf.constant(np.log(q), tf.float32), targets, 1.0)


def test_token_accuracy_counts_real_tokens():
    logits = np.zeros((1, 4, 5), np.float32)
    logits[0, [0, 1, 2, 3], [2, 3, 1, 4]] = 1.0
    targets = np.array([[2, 4, 1, 0]], np.int32)
    correct, weight_sum = token_accuracy(logits, targets)
    assert (float(correct), float(weight_sum)) == (2.0, 3.0)


def test_mixed_precision_computes_in_float16_with_float32_logits():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        mixed = build_transformer(tiny_config(), VOCAB_SIZE)
        rng = np.random.default_rng(6)
        batch = {"inputs": random_ids(rng, [5, 2], 5), "targets": random_ids(rng, [4, 6], 6)}
        logits = mixed(batch)
        assert mixed.compute_dtype == "float16"
        assert mixed.encode(batch["inputs"]).dtype == tf.float16
        assert all(v.dtype == "float32" for v in mixed.trainable_variables)
        assert logits.dtype == tf.float32
        assert np.all(np.isfinite(logits.numpy()))
        with tf.GradientTape() as tape:
            loss_sum, _ = sequence_loss(mixed(batch, training=True), batch["targets"], 0.1)
        gradients = tape.gradient(loss_sum, mixed.trainable_variables)
        assert all(g is not None and g.dtype == tf.float32 for g in gradients)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    # The float32 model with the same weights gives nearly the same logits.
    keras.utils.set_random_seed(0)
    reference = build_transformer(tiny_config(), VOCAB_SIZE)
    reference.set_weights(mixed.get_weights())
    np.testing.assert_allclose(logits, reference(batch), atol=0.05)
