"""`python -m trainer --config=<name>|<file>.py[:<variant>] --workdir=DIR [--config.<f>=<v>]`.

Loads the config (a shipped one by name, e.g. `quickstart:sync`, or a Python file
with `get_config(variant)`; overrides are
type-checked and a misspelt field is an error), checks it, and trains.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import signal
import sys
import traceback

from trainer.quiet import quiet_tensorflow_start

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
    "Experiment config: a shipped one by name (quickstart, wmt14_en_fr, ...) or a file "
    "path/to/config.py, either with :<variant>.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, summaries, vocabulary and the final config."
)
_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "On a failure you can fix (a refused or unreachable service, a missing or empty data "
    "file, divergence, a full disk), print the traceback above the one line that says what "
    "to fix.",
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (which loads the config file), quietly, with one-line errors."""
    from trainer.config_names import resolve_config_flag

    try:
        argv = resolve_config_flag(argv)
    except ValueError as e:
        _refuse(str(e))
    with quiet_tensorflow_start():
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            message = str(e)
        except (AttributeError, KeyError) as e:  # a misspelt --config.<field>
            message = _unknown_field(argv) or str(e)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    _refuse(lines[-1] if lines else message)


def _refuse(message: str) -> None:
    """Exits with status 1 and `message` on one line: what the user has to fix."""
    print(f"python -m trainer: {message}", file=sys.stderr)
    _leave(1)


def _what_to_fix(error: BaseException, role=None) -> str | None:
    """The message of a failure the user causes and can fix; None for any other (a bug).

    These are the trainer's one-line errors; every other exception keeps its traceback.
    `role` is this process's `WorkerRole`: a worker other than the chief of a
    multi-worker job whose collective fails has lost its chief (or a peer).
    """
    from precond_service.client.core import PermanentServiceError
    from trainer.checkpoints import ResumeRefusedError
    from trainer.data.sources import DataFileError
    from trainer.data.tokenizer import VocabularyError
    from trainer.service_connection import ServiceUnreachableError

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        # checkpoints.DiskFullError, or any other write to a full disk.
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    if isinstance(error, (FileNotFoundError, PermissionError)) and error.filename:
        return f"{error.strerror}: {error.filename}"
    fixable = (
        PermanentServiceError,  # token, certificate or run id refused by the service
        ServiceUnreachableError,  # nothing answers at precond.address
        TimeoutError,  # precond.delay_timeout_s; a multi-worker job's chief file
        FloatingPointError,  # divergence: train.max_loss, skipped steps
        ResumeRefusedError,  # a config that would change the run in the workdir
        DataFileError,  # config.data's files: unreadable, empty, not parallel text
        FileNotFoundError,  # config.data's files, TLS and token files
        PermissionError,
        VocabularyError,  # config.data.vocab_size and the training text
    )
    if isinstance(error, fixable):
        return str(error)
    if role is not None and not role.is_chief:
        return _lost_peers(error, role)
    return None


def _lost_peers(error: BaseException, role) -> str | None:
    """One line for a worker whose collective failed because the chief or a peer stopped."""
    import tensorflow as tf

    lost = (
        tf.errors.UnavailableError,
        tf.errors.CancelledError,
        tf.errors.AbortedError,
        tf.errors.DeadlineExceededError,
    )
    collective = isinstance(error, tf.errors.OpError) and "ollective" in str(error)
    if not isinstance(error, lost) and not collective:
        return None
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return (
        f"{role.task} lost the other processes of this multi_worker job "
        f"({type(error).__name__}: {first}): the chief (or another worker) stopped or "
        "failed; see the chief's train.log in the workdir, then start every worker again"
    )


def _unknown_field(argv: list[str]) -> str | None:
    """'config has no field X; did you mean Y?' for the first override naming no field."""
    from trainer.config import default_config

    fields = _field_names(default_config())
    for arg in argv[1:]:
        if arg.startswith("--config."):
            name = arg[len("--config.") :].split("=", 1)[0]
            if name not in fields:
                nearest = difflib.get_close_matches(name, sorted(fields), n=1)
                hint = f"; did you mean config.{nearest[0]}?" if nearest else ""
                return f"config has no field config.{name}{hint}"
    return None


def _field_names(config, prefix: str = "") -> set[str]:
    names = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            names |= _field_names(value, f"{prefix}{key}.")
        else:
            names.add(f"{prefix}{key}")
    return names


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _refuse(f"unexpected arguments: {' '.join(argv[1:])}")
    # SIGINT saves a checkpoint and stops, even where the shell started this process
    # with SIGINT ignored (a background job of a script), where Python leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Imported here so that --help comes without loading TensorFlow.
    with quiet_tensorflow_start():
        from trainer import config as config_lib
        from trainer import process_setup, train
        from trainer.distribution import worker_role

    config = _CONFIG.value
    try:
        config_lib.validate(config)
        # Under multi_worker a worker other than the chief logs in its own directory.
        own_dir = worker_role(config).workdir(_WORKDIR.value)
    except ValueError as e:
        _refuse(str(e))
    os.makedirs(own_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(own_dir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    process_setup.setup_process(config)
    try:
        result = train.train_and_evaluate(config, _WORKDIR.value)
    except KeyboardInterrupt:
        # The trainer has saved a checkpoint, said so in one line and stopped its
        # service child; no traceback, the shell's status for SIGINT.
        _leave(130)
    except Exception as e:
        # The one place that turns a failure the user can fix into one line.
        message = _what_to_fix(e, worker_role(config))
        if message is None:
            raise
        # The traceback goes to train.log alone (the console's log handler would print it).
        handler.handle(
            logging.LogRecord(
                "trainer", logging.ERROR, __file__, 0, "stopped: %s", (message,), sys.exc_info()
            )
        )
        if _VERBOSE.value:
            traceback.print_exc()
        _refuse(message)
    if result is None:  # a multi-worker job's worker: the chief evaluates
        print(f"done: this worker's checkpoints are in {own_dir}")
        _leave(0)
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
    app.run(main, flags_parser=parse_flags)
