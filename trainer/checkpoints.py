"""The workdir's run state on disk: its config, its checkpoints, and never losing either.

A resume goes in three steps, so that nothing of a run is lost by mistake:

1. `check_resume(config, workdir)`, before anything is written or moved: a
   config that changes a field outside `config.RESUMABLE_FIELDS` is refused
   with one message listing the fields; `train.restart=True` instead moves the
   previous run to `WORKDIR/previous/<UTC time>/`.
2. `restore_newest(checkpoint, directory)`: each checkpoint is read in full
   (checksums) before it is restored. Damage (a bad checksum, a file cut short,
   garbage, a missing file) sets it aside in `checkpoints/corrupt/` and the
   previous one is tried; a structural mismatch (the saved state does not fit
   the model or optimizer built now) raises and moves nothing.
3. `write_config(config, workdir)` once the restore succeeded.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import logging
import os
import re
import shutil

import ml_collections
import tensorflow as tf

from trainer import config as config_lib

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# Checkpoints that could not be read are moved here, out of the way of resumes.
CORRUPT_DIR = "corrupt"
CONFIG_FILE = "config.json"
# `train.restart=True` moves an earlier run here, under the UTC time of the move.
PREVIOUS_DIR = "previous"
# What `train.restart=True` moves out of the way (the rest of the workdir stays:
# the vocabulary, the run id, train.log and events.jsonl, which go on appending).
_RUN_FILES = (CHECKPOINT_DIR, CONFIG_FILE, "summaries", "results.json")
# What reading a damaged checkpoint raises: DataLossError for a bad checksum or
# garbage, NotFoundError for a missing file, IndexError for a file cut short.
# Reading involves no model, so whatever it raises is damage.
_UNREADABLE = (tf.errors.OpError, IndexError, ValueError, AssertionError)
# What restoring a readable checkpoint raises when the input iterator's state
# (read only by the restore) is damaged.
_DAMAGE = (tf.errors.OpError, IndexError)
# What restoring a readable checkpoint into objects of other shapes raises.
_MISMATCH = (ValueError, AssertionError)


class ResumeRefusedError(ValueError):
    """The config cannot resume the run in the workdir; nothing was written or moved."""


class DiskFullError(OSError):
    """A checkpoint could not be written: its disk is full (errno ENOSPC)."""


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """Saves a checkpoint numbered `step` with `manager`; returns its path.

    Raises:
        DiskFullError: Its disk has no space left (TensorFlow reports that as
            RESOURCE_EXHAUSTED, Python as ENOSPC); the checkpoints already there
            are kept.
    """
    try:
        return manager.save(checkpoint_number=step)
    except (tf.errors.ResourceExhaustedError, OSError) as e:
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left" not in str(e):
            raise
        kept = manager.latest_checkpoint
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the disk of {manager.directory} to save the checkpoint of step "
            f"{step}: free space there or lower config.train.keep_checkpoints, then run the "
            f"same command to resume from {kept or 'the start (no checkpoint was saved)'}",
        ) from e


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the final config as JSON into the workdir, for reproducing the run."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote into `workdir` (for translation and inspection)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: is {workdir!r} the --workdir of a training run?"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config that would change the run in `workdir`, or moves that run away.

    Writes and moves nothing unless `config.train.restart` is set, in which case
    the earlier run's files go to `WORKDIR/previous/<UTC time>/`.

    Raises:
        ResumeRefusedError: `config` differs from the workdir's config.json in a field
            outside `config.RESUMABLE_FIELDS` and `train.restart` is False.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if config.train.restart:
        move_previous_run(workdir)
        return
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = json.loads(config.to_json_best_effort())
    changed = config_lib.config_differences(old, new)
    if changed:
        lines = "\n".join(f"  {field}: {a!r} -> {b!r}" for field, (a, b) in changed.items())
        raise ResumeRefusedError(
            f"the config differs from the run in {workdir} ({path}) in fields a resume cannot "
            f"change:\n{lines}\nTo resume that run, use its config for these fields. To start "
            f"afresh, use a new --workdir, or add --config.train.restart=True to move the "
            f"earlier run to {os.path.join(workdir, PREVIOUS_DIR)}/<UTC time>/ (nothing is "
            "deleted)."
        )


def move_previous_run(workdir: str) -> str | None:
    """Moves the run files of `workdir` to `previous/<UTC time>/`; returns it (None: none)."""
    present = [name for name in _RUN_FILES if os.path.exists(os.path.join(workdir, name))]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(workdir, PREVIOUS_DIR, stamp)
    os.makedirs(target)
    for name in present:
        shutil.move(os.path.join(workdir, name), os.path.join(target, name))
    log.warning(
        "config.train.restart=True: moved the earlier run (%s) to %s; starting from step 0",
        ", ".join(present),
        target,
    )
    return target


def checkpoints_newest_first(directory: str) -> list[str]:
    """Checkpoint prefixes (`.../ckpt-N`) that have an index file, largest N first."""
    numbered = []
    for index in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(index))
        if match:
            numbered.append((int(match.group(1)), index[: -len(".index")]))
    return [path for _, path in sorted(numbered, reverse=True)]


def restore_newest(checkpoint: tf.train.Checkpoint, directory: str) -> str | None:
    """Restores the newest undamaged checkpoint in `directory`; returns its path (None: none).

    Raises:
        RuntimeError: A checkpoint's state does not fit `checkpoint`'s objects
            (nothing is moved), or every checkpoint failed after one was partly
            restored.
    """
    partly_restored = False
    damaged = 0
    for path in checkpoints_newest_first(directory):
        try:
            _read_all_tensors(path)
        except _UNREADABLE as e:
            _report_damage(directory, path, e)
            damaged += 1
            continue
        partly_restored = True
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except _MISMATCH as e:
            raise RuntimeError(
                f"checkpoint {path} does not fit the model and optimizer this config builds "
                f"({type(e).__name__}: {_first_line(e)}). Nothing was moved. Resume with the "
                "code and config that wrote it, or start afresh in a new --workdir or with "
                "--config.train.restart=True"
            ) from e
        except _DAMAGE as e:  # the input iterator's state is only read by the restore
            _report_damage(directory, path, e)
            damaged += 1
            continue
        return path
    if partly_restored:
        # A failed restore may have set some variables; an older checkpoint
        # would have overwritten them all, but there is none left.
        raise RuntimeError(
            f"no checkpoint in {directory} could be restored (see the warnings; they are "
            f"in {os.path.join(directory, CORRUPT_DIR)}); start in a new workdir"
        )
    if damaged:
        log.warning(
            "no checkpoint could be restored from %s (the damaged ones are in %s/): "
            "starting from step 0",
            directory,
            CORRUPT_DIR,
        )
    else:
        log.info("no checkpoint in %s: starting from step 0", directory)
    return None


def _report_damage(directory: str, path: str, error: BaseException) -> None:
    log.warning(
        "checkpoint %s is corrupt or incomplete (%s: %s); moving it to %s/ and trying the "
        "previous one",
        path,
        type(error).__name__,
        _first_line(error),
        CORRUPT_DIR,
    )
    _set_aside(directory, glob.glob(glob.escape(path) + ".*"))


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def _read_all_tensors(path: str) -> None:
    """Reads the tensors of a checkpoint, which verifies their checksums; raises if one fails."""
    reader = tf.train.load_checkpoint(path)
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype != tf.variant:  # the input iterator's state; read by the restore itself
            reader.get_tensor(name)


def _set_aside(directory: str, paths: list[str]) -> None:
    """Moves `paths` into `directory/corrupt/` (kept for inspection, out of the way)."""
    target = os.path.join(directory, CORRUPT_DIR)
    os.makedirs(target, exist_ok=True)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            shutil.move(path, os.path.join(target, os.path.basename(path)))
