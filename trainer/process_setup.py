"""Process-wide TensorFlow state a run needs, set once per process.

`__main__` calls `setup_process(config)` before building the `Trainer`;
benchmarks and tests that build trainers call it themselves. The Trainer only
checks (`check_process_setup`), so that building one changes no global state.
"""

from __future__ import annotations

import keras
import ml_collections
import tensorflow as tf


def setup_process(config: ml_collections.ConfigDict) -> None:
    """Sets the process-wide TensorFlow state a run of `config` needs; call before `Trainer`.

    The random seed (initialisation, dropout, shuffling), op determinism when
    `train.deterministic`, and the mixed-precision global policy. (TensorFlow's
    C++ log level must be set before TensorFlow is imported: `__main__` does.)
    """
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
