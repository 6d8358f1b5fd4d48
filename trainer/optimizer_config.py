"""The optimizer and learning-rate schedule a config describes (`optimizer`, `precond`)."""

from __future__ import annotations

from typing import Any

import keras
import ml_collections
import tensorflow as tf

from trainer import config as config_lib
from trainer.optimizers import Shampoo


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then `peak * sqrt(warmup / step)` ("rsqrt") or flat.

    Args:
        peak: Learning rate at the end of warmup.
        warmup_steps: Steps of the linear warmup (0 for none).
        decay: "rsqrt" or "constant".
    """

    def __init__(self, peak: float, warmup_steps: int, decay: str = "rsqrt"):
        if decay not in config_lib.SCHEDULES:
            raise ValueError(f"decay must be one of {config_lib.SCHEDULES}, got {decay!r}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        # Step s applies learning_rate(s); count from 1 so the first step moves.
        step = tf.cast(step, tf.float32) + 1.0
        warmup = float(max(self.warmup_steps, 1))
        rate = self.peak * tf.minimum(1.0, step / warmup)
        if self.decay == "rsqrt":
            rate *= tf.minimum(1.0, tf.sqrt(warmup / step))
        return rate

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "decay": self.decay}


def make_optimizer(config: ml_collections.ConfigDict) -> keras.optimizers.Optimizer:
    """The optimizer `config.optimizer` and `config.precond` describe."""
    opt = config.optimizer
    schedule = WarmupSchedule(opt.learning_rate, opt.warmup_steps, opt.schedule)
    common: dict[str, Any] = {"learning_rate": schedule}
    if opt.weight_decay:
        common["weight_decay"] = opt.weight_decay
    if opt.name == "adam":
        return keras.optimizers.Adam(
            beta_1=opt.beta1, beta_2=opt.beta2, epsilon=opt.epsilon, **common
        )
    if opt.name == "adagrad":
        # Sums start at zero, as in Duchi et al. and Shampoo's own AdaGrad graft;
        # Keras's default of 0.1 damps every step while the sums are small.
        return keras.optimizers.Adagrad(
            initial_accumulator_value=0.0, epsilon=opt.epsilon, **common
        )
    sh = opt.shampoo
    return Shampoo(
        block_size=sh.block_size,
        beta1=opt.beta1,
        beta2=opt.beta2,
        nesterov=sh.nesterov,
        matrix_epsilon=sh.matrix_epsilon,
        ridge_mode=sh.ridge_mode,
        diagonal_epsilon=opt.epsilon,
        graft_type=sh.graft_type,
        start_preconditioning_step=sh.start_preconditioning_step,
        statistics_compute_steps=sh.statistics_compute_steps,
        preconditioning_compute_steps=config.precond.update_steps,
        skip_preconditioning_dim_size_gt=sh.skip_preconditioning_dim_size_gt,
        exponent_override=sh.exponent_override or None,
        inverse_failure_threshold=sh.inverse_failure_threshold,
        root_method=sh.root_method,
        preconditioner=sh.preconditioner,
        momentum_type=sh.momentum_type,
        graft_scope=sh.graft_scope,
        statistics_beta2=sh.statistics_beta2,
        precondition_mode=config.precond.mode,
        **common,
    )
