"""The compiled training step and the inner loop that runs it N times on the device.

Nothing here touches the host: no NumPy, no service, no files. The controller
(trainer/controller.py) calls the inner loop and does host work between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import keras
import tensorflow as tf

from trainer.model import transformer
from trainer.optimizers.shampoo import run_then_true

# The sums an inner loop returns, over its steps.
LOOP_SUMS = ("loss_sum", "weight_sum", "tokens", "grad_norm_sum", "skipped")

InnerLoop = Callable[[Iterator, tf.Tensor], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class SkipCounters:
    """Steps skipped for non-finite gradients: in all, and in a row now."""

    total: tf.Variable
    in_a_row: tf.Variable


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    skipped: SkipCounters,
    label_smoothing: float,
    clip_norm: float,
) -> Callable[[Sequence[dict[str, tf.Tensor]]], dict[str, tf.Tensor]]:
    """One update from k micro-batches: loss, gradients, clipping, and the update unless non-finite.

    The step takes a sequence of k >= 1 batches (`train.accumulate_steps`). Its
    gradient is that of the mean loss over every target token of all k, so k
    micro-batches give the update one batch holding them all would (to float
    rounding): each micro-batch's summed loss is divided by the tokens of all k
    before its gradient is taken, and the gradients are added.

    A step whose gradient norm is NaN or infinite changes nothing (no weight, no
    optimizer variable, no Shampoo statistic, not `optimizer.iterations`) and is
    counted in `skipped`. Under float16 loss scaling the loss-scale optimizer
    skips it itself and lowers its scale.
    """
    variables = model.trainable_variables
    scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def gradients(
        batch: dict[str, tf.Tensor], all_weights: tf.Tensor
    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Gradient of one micro-batch's loss over `all_weights` tokens; its loss and weight."""
        with tf.GradientTape() as tape:
            logits = model(batch, training=True)
            loss_sum, weight_sum = transformer.sequence_loss(
                logits, batch["targets"], label_smoothing
            )
            loss = loss_sum / tf.maximum(all_weights, 1.0)
            scaled = optimizer.scale_loss(loss) if scale_loss else loss
        return tape.gradient(scaled, variables), loss_sum, weight_sum

    def train_step(batches: Sequence[dict[str, tf.Tensor]]) -> dict[str, tf.Tensor]:
        if len(batches) == 1:
            grads, loss_sum, weight_sum = gradients(batches[0], _target_tokens(batches[0]))
        else:
            all_weights = tf.add_n([_target_tokens(batch) for batch in batches])
            parts = [gradients(batch, all_weights) for batch in batches]
            # Dense sums (an embedding's gradient is IndexedSlices per micro-batch).
            grads = [
                tf.add_n([tf.convert_to_tensor(p[0][i]) for p in parts])
                for i in range(len(variables))
            ]
            loss_sum = tf.add_n([p[1] for p in parts])
            weight_sum = tf.add_n([p[2] for p in parts])
        # With loss scaling the gradients stay scaled (the optimizer unscales
        # them); only the scalars of the norm and the clip are adjusted.
        scale = optimizer.dynamic_scale if scale_loss else 1.0
        grad_norm = tf.linalg.global_norm(grads) / scale
        # The norm is NaN or infinite exactly when a gradient is (or when their
        # squares overflow, which clipping would turn into NaN anyway).
        finite = tf.math.is_finite(grad_norm)
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm * scale, use_norm=grad_norm * scale)
        if scale_loss:
            optimizer.apply_gradients(zip(grads, variables))
        else:
            tf.cond(
                finite,
                lambda: run_then_true(lambda: optimizer.apply_gradients(zip(grads, variables))),
                lambda: tf.constant(False),
            )
        skip = 1 - tf.cast(finite, tf.int64)
        skipped.total.assign_add(skip)
        skipped.in_a_row.assign((skipped.in_a_row + 1) * skip)
        kept = tf.cast(finite, tf.float32)
        inputs = tf.add_n([tf.reduce_sum(tf.cast(b["inputs"] > 0, tf.float32)) for b in batches])
        tokens = inputs + weight_sum
        # Sums over the steps that were applied (a skipped step's loss may be NaN).
        return {
            "loss_sum": tf.where(finite, tf.cast(loss_sum, tf.float32), 0.0),
            "weight_sum": weight_sum * kept,
            "tokens": tokens,
            "grad_norm_sum": tf.where(finite, grad_norm, 0.0),
            "skipped": tf.cast(skip, tf.float32),
        }

    return train_step


def _target_tokens(batch: dict[str, tf.Tensor]) -> tf.Tensor:
    """The non-pad target tokens of a batch: `sequence_loss`'s weight_sum."""
    return tf.reduce_sum(tf.cast(batch["targets"] > 0, tf.float32))


def make_inner_loop(
    train_step: Callable[[Sequence[dict[str, tf.Tensor]]], dict[str, tf.Tensor]],
    jit_compile: bool,
    accumulate_steps: int = 1,
) -> InnerLoop:
    """`loop(iterator, n)`: `n` updates in one tf.function call; returns the `LOOP_SUMS`.

    Each update takes `accumulate_steps` batches from the iterator. (With
    `jit_compile`, XLA compiles the step once per combination of their padded shapes.)
    """
    step_fn = tf.function(train_step, jit_compile=jit_compile)

    @tf.function
    def loop(iterator: Iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        totals = {name: tf.constant(0.0) for name in LOOP_SUMS}
        for _ in tf.range(num_steps):
            values = step_fn(tuple(next(iterator) for _ in range(accumulate_steps)))
            totals = {name: totals[name] + tf.cast(values[name], tf.float32) for name in totals}
        return totals

    return loop
