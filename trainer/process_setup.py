"""Process-wide TensorFlow state a run needs, set once per process.

`__main__` calls `setup_process(config)` before building the `Trainer`;
benchmarks and tests that build trainers call it themselves. The Trainer only
checks (`check_process_setup`), so that building one changes no global state.
"""

from __future__ import annotations

import contextlib
import logging
import os

import keras
import ml_collections
import tensorflow as tf

from precond_service.client import parse_cpus
from trainer.distribution import split_cpu, start_multi_worker

log = logging.getLogger(__name__)


def setup_process(config: ml_collections.ConfigDict) -> None:
    """Sets the process-wide TensorFlow state a run of `config` needs; call before `Trainer`.

    The CPUs of `train.device_cpus` (pinned first, while TensorFlow's thread
    pools can still be sized), the logical CPU devices of
    `train.virtual_cpu_devices`, the multi-worker strategy of
    `train.distribution="multi_worker"` (from TF_CONFIG), the random seed (initialisation, dropout,
    shuffling), op determinism when `train.deterministic`, and the
    mixed-precision global policy. (TensorFlow's
    C++ log level must be set before TensorFlow is imported: `__main__` does.)
    """
    pin_to_cpus(config.train.device_cpus)
    split_cpu(config.train.virtual_cpu_devices)
    start_multi_worker(config)
    keras.utils.set_random_seed(config.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(config.train.mixed_precision or "float32")


def check_process_setup(config: ml_collections.ConfigDict) -> None:
    """Refuses to build a run under a mixed-precision policy other than its config's.

    Raises:
        ValueError: The global policy is not `train.mixed_precision` (or float32).
    """
    wanted = config.train.mixed_precision or "float32"
    policy = keras.mixed_precision.global_policy().name
    if policy != wanted:
        raise ValueError(
            f"config.train.mixed_precision={config.train.mixed_precision!r} needs the global "
            f"policy {wanted!r}, but it is {policy!r}: call "
            "trainer.process_setup.setup_process(config) before building the Trainer"
        )


def pin_to_cpus(cpus: str) -> frozenset[int]:
    """Pins every thread of this process, and those it starts later, to `cpus`.

    TensorFlow's intra- and inter-op pools are sized to the pinned cores when
    TensorFlow has not started them yet; a process that already ran ops keeps
    its pool sizes (a warning says so). Call it before the first op.

    Args:
        cpus: A CPU list ("0", "0-3", "0,2"); "" pins nothing.

    Returns:
        The CPUs pinned to (empty for "").
    """
    chosen = parse_cpus(cpus)
    if not chosen:
        return chosen
    # sched_setaffinity(0) pins the calling thread only: pin every thread there is.
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), chosen)
    threads = tf.config.threading
    if (threads.get_intra_op_parallelism_threads(), threads.get_inter_op_parallelism_threads()) == (
        len(chosen),
        len(chosen),
    ):
        return chosen  # pinned before, in this process
    try:
        threads.set_intra_op_parallelism_threads(len(chosen))
        threads.set_inter_op_parallelism_threads(len(chosen))
    except RuntimeError as e:  # TensorFlow's runtime is already up
        log.warning("pinned to CPUs %s, but TensorFlow's thread pools keep their size: %s", cpus, e)
    return chosen
