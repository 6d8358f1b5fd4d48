"""Gradient accumulation: k micro-batches make the update of one batch holding them all."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_model import VOCAB_SIZE, random_ids
from trainer import step_fn
from trainer.config import default_config
from trainer.model.transformer import build_transformer
from trainer.optimizer_config import make_optimizer


def _micro_batches(seed: int) -> list[dict[str, np.ndarray]]:
    """Two micro-batches of different sizes, widths and token counts."""
    rng = np.random.default_rng(seed)
    return [
        {"inputs": random_ids(rng, [5, 3, 6], 6), "targets": random_ids(rng, [4, 7, 2], 7)},
        {"inputs": random_ids(rng, [8, 2], 9), "targets": random_ids(rng, [9, 5], 10)},
    ]


def _concatenated(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch holding the rows of all, padded to the widest."""
    out = {}
    for name in ("inputs", "targets"):
        width = max(batch[name].shape[1] for batch in batches)
        rows = [np.pad(b[name], ((0, 0), (0, width - b[name].shape[1]))) for b in batches]
        out[name] = np.concatenate(rows)
    return out


def _train(optimizer_name: str, steps: list[list[dict[str, np.ndarray]]]) -> list[np.ndarray]:
    """Weights and optimizer variables after one update per entry of `steps`."""
    config = default_config()
    model_config = config.model
    model_config.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, max_length=16, dropout=0.0)
    model_config.attention_dropout = 0.0
    config.optimizer.name = optimizer_name
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 0
    config.optimizer.shampoo.start_preconditioning_step = 1
    config.optimizer.shampoo.block_size = 8
    # A ridge well above float32 rounding: roots of rank-deficient statistics are
    # then set by the statistics, not by the rounding of their null directions.
    config.optimizer.shampoo.matrix_epsilon = 1e-3
    config.precond.mode = "sync"
    config.precond.update_steps = 1
    keras.utils.set_random_seed(0)
    model = build_transformer(model_config, VOCAB_SIZE)
    optimizer = make_optimizer(config)
    skipped = step_fn.SkipCounters(tf.Variable(0, dtype=tf.int64), tf.Variable(0, dtype=tf.int64))
    step = tf.function(
        step_fn.make_train_step(model, optimizer, skipped, label_smoothing=0.1, clip_norm=0.0)
    )
    for batches in steps:
        step(tuple({k: tf.constant(v) for k, v in b.items()} for b in batches))
    assert int(skipped.total.numpy()) == 0
    return [v.numpy() for v in [*model.trainable_variables, *optimizer.variables]]


@pytest.mark.parametrize("optimizer_name", ["adam", "shampoo"])
def test_two_micro_batches_update_as_one_batch_holding_both(optimizer_name):
    micro = [_micro_batches(seed) for seed in range(3)]
    accumulated = _train(optimizer_name, micro)
    whole = _train(optimizer_name, [[_concatenated(batches)] for batches in micro])

    assert len(accumulated) == len(whole)
    moved = 0
    for got, expected in zip(accumulated, whole):
        # Float rounding differs between the two orders of summation.
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * scale + 1e-7)
        moved += not np.array_equal(got, np.zeros_like(got))
    assert moved > len(whole) // 2  # the comparison is of trained state, not of zeros


def test_one_micro_batch_differs_from_two():
    # The test above could pass if the second micro-batch were ignored; it is not.
    micro = _micro_batches(0)
    first_only = _train("adam", [[micro[0]]])
    both = _train("adam", [micro])
    assert any(not np.allclose(a, b) for a, b in zip(first_only, both))
