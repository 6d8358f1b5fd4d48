"""The compiled training step and the inner loop that runs it N times on the device.

Nothing here touches the host: no NumPy, no service, no files. The controller
(trainer/controller.py) calls the inner loop and does host work between calls.
"""

from __future__ import annotations

import dataclasses
import functools
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

    See `TrainStep`.
    """
    return TrainStep(model, optimizer, skipped, label_smoothing, clip_norm)


class TrainStep:
    """One update from k micro-batches, in each replica: `step(batches) -> LOOP_SUMS`.

    The step takes a sequence of k >= 1 batches (`train.accumulate_steps`). Its
    gradient is that of the mean loss over every target token of all k (and of
    every replica), so k micro-batches give the update one batch holding them all
    would (to float rounding): each micro-batch's summed loss is divided by the
    tokens of all k before its gradient is taken, and the gradients are added.
    Under several replicas the sum is all-reduced before the non-finite check and
    clipping, so every replica sees the global gradient and takes the same branch.

    A step whose gradient norm is NaN or infinite changes nothing (no weight, no
    optimizer variable, no Shampoo statistic, not `optimizer.iterations`) and is
    counted in `skipped`. Under float16 loss scaling the loss-scale optimizer
    skips it itself and lowers its scale.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        skipped: SkipCounters,
        label_smoothing: float,
        clip_norm: float,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.variables = model.trainable_variables
        self.skipped = skipped
        self.label_smoothing = label_smoothing
        self.clip_norm = clip_norm
        self.scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def __call__(self, batches: Sequence[dict[str, tf.Tensor]]) -> dict[str, tf.Tensor]:
        replica = tf.distribute.get_replica_context()
        grads, loss_sum, weight_sum = self._global_gradients(batches, replica)
        # With loss scaling the gradients stay scaled (the optimizer unscales
        # them); only the scalars of the norm and the clip are adjusted.
        scale = self.optimizer.dynamic_scale if self.scale_loss else 1.0
        grad_norm = tf.linalg.global_norm(grads) / scale
        # The norm is NaN or infinite exactly when a gradient is (or when their
        # squares overflow, which clipping would turn into NaN anyway).
        finite = tf.math.is_finite(grad_norm)
        if self.clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(
                grads, self.clip_norm * scale, use_norm=grad_norm * scale
            )
        self._apply(grads, finite, replica)
        skip = 1 - tf.cast(finite, tf.int64)
        self.skipped.total.assign_add(skip)
        self.skipped.in_a_row.assign((self.skipped.in_a_row + 1) * skip)
        inputs = tf.add_n([tf.reduce_sum(tf.cast(b["inputs"] > 0, tf.float32)) for b in batches])
        # Sums over the steps that were applied (a skipped step's loss may be NaN).
        return {
            "loss_sum": tf.where(finite, tf.cast(loss_sum, tf.float32), 0.0),
            "weight_sum": weight_sum * tf.cast(finite, tf.float32),
            "tokens": inputs + weight_sum,
            "grad_norm_sum": tf.where(finite, grad_norm, 0.0),
            "skipped": tf.cast(skip, tf.float32),
        }

    def _global_gradients(
        self, batches: Sequence[dict[str, tf.Tensor]], replica: tf.distribute.ReplicaContext
    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """The gradient of the mean loss over all micro-batches and replicas; local loss, weight."""
        replicas = replica.num_replicas_in_sync
        # One micro-batch on one replica: its own weight (from the loss) is the total.
        all_weights = None
        if len(batches) > 1 or replicas > 1:
            all_weights = tf.add_n([_target_tokens(batch) for batch in batches])
        if replicas > 1:  # The loss is the mean over the tokens of every replica.
            all_weights = replica.all_reduce(tf.distribute.ReduceOp.SUM, all_weights)
        parts = [self._gradients(batch, all_weights) for batch in batches]
        if len(parts) == 1:
            grads, loss_sum, weight_sum = parts[0]
        else:
            # Dense sums (an embedding's gradient is IndexedSlices per micro-batch).
            grads = [
                tf.add_n([tf.convert_to_tensor(g) for g in each])
                for each in zip(*(p[0] for p in parts))
            ]
            loss_sum = tf.add_n([p[1] for p in parts])
            weight_sum = tf.add_n([p[2] for p in parts])
        if replicas > 1:
            dense = [tf.convert_to_tensor(g) for g in grads]
            grads = replica.all_reduce(tf.distribute.ReduceOp.SUM, dense)
        return grads, loss_sum, weight_sum

    def _gradients(
        self, batch: dict[str, tf.Tensor], all_weights: tf.Tensor | None
    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Gradient of one micro-batch's loss over `all_weights` tokens (None: its own).

        Returns the gradient, the micro-batch's loss sum and its weight.
        """
        with tf.GradientTape() as tape:
            logits = self.model(batch, training=True)
            loss_sum, weight_sum = transformer.sequence_loss(
                logits, batch["targets"], self.label_smoothing
            )
            total = weight_sum if all_weights is None else all_weights
            loss = loss_sum / tf.maximum(total, 1.0)
            scaled = self.optimizer.scale_loss(loss) if self.scale_loss else loss
        return tape.gradient(scaled, self.variables), loss_sum, weight_sum

    def _apply(
        self, grads: list[tf.Tensor], finite: tf.Tensor, replica: tf.distribute.ReplicaContext
    ) -> None:
        """Applies `grads` where `finite` (the loss-scale optimizer decides for itself)."""
        replicas = replica.num_replicas_in_sync
        if replicas > 1:
            # Keras all-reduces (sums) what it is given once more: each replica
            # hands it 1/replicas of the sum (exact for a power of two).
            grads = [g / replicas for g in grads]
        if self.scale_loss:
            self._apply_now(grads)
        elif replicas > 1:
            # A cond may not hold Keras's own all-reduce in replica context: it
            # goes in cross-replica context (as Keras's LossScaleOptimizer does).
            replica.merge_call(self._apply_on_every_replica, args=(grads, finite))
        else:
            apply_if(finite, lambda: self._apply_now(grads))

    def _apply_now(self, grads: list[tf.Tensor]) -> None:
        self.optimizer.apply_gradients(zip(grads, self.variables))

    def _apply_on_every_replica(
        self, strategy: tf.distribute.Strategy, grads: list, finite: tf.Tensor
    ) -> None:
        # The same on every replica: the gradients were all-reduced.
        finite = strategy.experimental_local_results(finite)[0]
        apply_if(
            finite, lambda: strategy.extended.call_for_each_replica(self._apply_now, args=(grads,))
        )


def apply_if(condition: tf.Tensor, fn: Callable[[], object]) -> None:
    """Runs `fn` (ops with side effects only) where `condition` holds."""
    tf.cond(condition, lambda: run_then_true(fn), lambda: tf.constant(False))


def _group_of_replica(groups: list, context: tf.distribute.ValueContext) -> object:
    # Global replica ids run over the workers in turn, each one's local replicas together.
    return groups[context.replica_id_in_sync_group % len(groups)]


def _target_tokens(batch: dict[str, tf.Tensor]) -> tf.Tensor:
    """The non-pad target tokens of a batch: `sequence_loss`'s weight_sum."""
    return tf.reduce_sum(tf.cast(batch["targets"] > 0, tf.float32))


def make_inner_loop(
    train_step: Callable[[Sequence[dict[str, tf.Tensor]]], dict[str, tf.Tensor]],
    jit_compile: bool,
    accumulate_steps: int = 1,
    strategy: tf.distribute.Strategy | None = None,
) -> InnerLoop:
    """`loop(iterator, n)`: `n` updates in one tf.function call; returns the `LOOP_SUMS`.

    Each update takes `accumulate_steps` batches from the iterator for each
    replica of `strategy` on this worker, in turn. (With `jit_compile`, XLA
    compiles the step once per combination of their padded shapes.)
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    # Replicas of this process: all of them but under "multi_worker" (one per CPU worker).
    local_replicas = len(strategy.extended.worker_devices) if replicas > 1 else 1
    # With replicas the step is traced into the loop: a nested tf.function may
    # not hold the all-reduce (and XLA is not used).
    step_fn = tf.function(train_step, jit_compile=jit_compile) if replicas == 1 else train_step
    # Loss, tokens and weights are per replica: summed; the rest is the same everywhere.
    reductions = {name: tf.distribute.ReduceOp.MEAN for name in LOOP_SUMS} | {
        name: tf.distribute.ReduceOp.SUM for name in ("loss_sum", "weight_sum", "tokens")
    }

    @tf.function
    def loop(iterator: Iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        totals = {name: tf.constant(0.0) for name in LOOP_SUMS}
        for _ in tf.range(num_steps):
            if replicas == 1:
                batches = tuple(next(iterator) for _ in range(accumulate_steps))
            else:  # Local replica r takes the r-th group of accumulate_steps batches.
                groups = [
                    tuple(next(iterator) for _ in range(accumulate_steps))
                    for _ in range(local_replicas)
                ]
                batches = strategy.experimental_distribute_values_from_function(
                    functools.partial(_group_of_replica, groups)
                )
            values = strategy.run(step_fn, args=(batches,))
            totals = {
                name: totals[name]
                + tf.cast(strategy.reduce(reductions[name], values[name], axis=None), tf.float32)
                for name in totals
            }
        return totals

    return loop
