"""Data parallelism with TensorFlow's own engine: `train.distribution` as a tf.distribute.Strategy.

- "none": the default strategy, one device.
- "mirrored": `tf.distribute.MirroredStrategy` over every local GPU; on a host
  without GPUs over the `train.virtual_cpu_devices` logical CPU devices that
  `split_cpu` made (a CPU-only stand-in for tests and correctness runs).

The training step (trainer/step_fn.py) runs in each replica on its share of the
global batch. It all-reduces the gradients itself, so that the non-finite check
and clipping see the global gradient and every replica takes the same branch, and
applies them once in cross-replica context, where Keras's own all-reduce is
skipped and each replica's copy of every variable gets the same update. Shampoo's
statistics are therefore computed from the all-reduced gradient and are equal on
every replica; roots from the service are assigned in cross-replica context, so
every replica installs them at the same step.
"""

from __future__ import annotations

import ml_collections
import tensorflow as tf


def split_cpu(count: int) -> None:
    """Splits the first CPU into `count` logical devices (0 or 1: leaves it whole).

    Call it before TensorFlow's runtime starts (before the first op).

    Raises:
        RuntimeError: The runtime already started with another split.
    """
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise RuntimeError(
                f"config.train.virtual_cpu_devices={count} must be set before TensorFlow "
                f"starts: call trainer.process_setup.setup_process(config) first ({e})"
            ) from None


def make_strategy(config: ml_collections.ConfigDict) -> tf.distribute.Strategy:
    """The strategy `train.distribution` names.

    Raises:
        ValueError: "mirrored" on a CPU-only host without `train.virtual_cpu_devices`
            set up (it would have one replica, which "none" does better).
    """
    if config.train.distribution == "none":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        raise ValueError(
            "config.train.distribution='mirrored' found one device: on a host without "
            "GPUs set config.train.virtual_cpu_devices >= 2 (logical CPU devices)"
        )
    return tf.distribute.MirroredStrategy(devices=devices)


def replica_batch_tokens(config: ml_collections.ConfigDict, replicas: int) -> int:
    """Each replica's share of `data.tokens_per_batch` (the global budget of one micro-batch).

    Raises:
        ValueError: The share would not hold one example of `data.max_length`.
    """
    share = config.data.tokens_per_batch // replicas
    if share < config.data.max_length:
        raise ValueError(
            f"config.data.tokens_per_batch={config.data.tokens_per_batch} split over {replicas} "
            f"replicas leaves {share} tokens each, less than one example of "
            f"config.data.max_length={config.data.max_length}: raise tokens_per_batch"
        )
    return share
