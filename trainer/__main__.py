"""`python -m trainer --config=configs/<file>.py[:<variant>] --workdir=DIR [--config.<f>=<v>]`.

Loads the config (a Python file with `get_config(variant)`; overrides are
type-checked and a misspelt field is an error), checks it, and trains.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import logging  # noqa: E402
import sys  # noqa: E402

try:
    from absl import app, flags
    from ml_collections import config_flags
except ImportError as e:  # a service-only install: `pip install .` without [trainer]
    sys.exit(
        f"python -m trainer needs the trainer's packages ({e.name} is missing): "
        "pip install 'async-shampoo[trainer]' (in a checkout: pip install -e '.[trainer]')"
    )

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config: configs/<file>.py or configs/<file>.py:<variant>.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, summaries, vocabulary and the final config."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Imported here so that --help and flag errors come without loading TensorFlow.
    from trainer import checkpoints, process_setup, train
    from trainer import config as config_lib

    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    os.makedirs(_WORKDIR.value, exist_ok=True)
    handler = logging.FileHandler(os.path.join(_WORKDIR.value, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    process_setup.setup_process(config)
    try:
        result = train.train_and_evaluate(config, _WORKDIR.value)
    except checkpoints.ResumeRefusedError as e:
        raise app.UsageError(str(e)) from None
    except KeyboardInterrupt:
        # The trainer has saved a checkpoint, said so in one line and stopped its
        # service child; no traceback, the shell's status for SIGINT.
        _leave(130)
    print(
        f"done at step {result.step}: dev loss {result.dev_loss:.4f}, dev BLEU "
        f"{result.dev_bleu:.2f}"
        + (f", test BLEU {result.test_bleu:.2f}" if result.test_bleu is not None else "")
        + f" (results in {os.path.join(_WORKDIR.value, 'results.json')})"
    )
    _leave(0)


def _leave(status: int) -> None:
    """Exits once everything is written, without tearing down the input pipeline.

    Tearing down tf.data's threads held up the interpreter's exit by 3-43 s
    (measured).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    app.run(main)
