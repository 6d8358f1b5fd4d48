"""A JSON-lines event log: what happened to a run, for programs rather than people.

The trainer and the service can each write one (`WORKDIR/events.jsonl`, the
service's `--events_file`). Every line is one JSON object with `time` (seconds
since the epoch), `event` (one of `Event`) and the event's own fields. Scripts
and tests read it with `read_events` instead of matching log text, which is free
to change.
"""

from __future__ import annotations

import enum
import json
import math
import numbers
import os
import threading
import time
from collections.abc import Iterator
from typing import Any


class Event(enum.StrEnum):
    """Every event name that is written, in one place."""

    # Trainer.
    STARTED = "started"  # step, resumed (bool)
    RESUMED = "resumed"  # step, checkpoint
    CHECKPOINT_SAVED = "checkpoint_saved"  # step, path
    PROGRESS = "progress"  # step, loss, step_ms, staleness_min/mean/max (null if none)
    SKIPPED_STEPS = "skipped_steps"  # step, count, in_a_row, total
    ROOTS_INSTALLED = "roots_installed"  # step, count
    SERVICE_RESTART_SEEN = "service_restart_seen"  # step, restarts_seen
    EVALUATED = "evaluated"  # step, split, loss, bleu
    INTERRUPTED = "interrupted"  # step
    FINISHED = "finished"  # step
    # A service process supervisor (precond_service.client.process).
    CHILD_STARTED = "child_started"  # pid, address
    CHILD_RESTARTED = "child_restarted"  # pid, address, restarts, exit_status
    # The service itself.
    SERVICE_STARTED = "service_started"  # incarnation, address, workers
    WORKER_RESTARTED = "worker_restarted"  # pid, reason
    RUN_DROPPED = "run_dropped"  # run_digest, blocks_released, reason: client/operator/expired
    DISPATCHER_FAILING = "dispatcher_failing"  # error, failures_in_a_row
    SERVICE_STOPPED = "service_stopped"


class EventLog:
    """Appends events to a JSON-lines file; thread-safe; a no-op without a path.

    Args:
        path: The file (created, or appended to); None writes nothing.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else os.fspath(path)
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: Event, **fields: Any) -> None:
        """Appends one event with `fields` (JSON-serialisable values) and flushes it."""
        if self._file is None:
            return
        record = {"time": round(time.time(), 6), "event": str(event)}
        record.update((name, _plain(value)) for name, value in fields.items())
        line = json.dumps(record, allow_nan=False) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """A JSON value for `value`: NumPy scalars as numbers, non-finite floats as null."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return str(value)


def iter_events(path: str | os.PathLike, event: Event | None = None) -> Iterator[dict[str, Any]]:
    """The events in `path`, oldest first; only `event` ones if given.

    A last line still being written (no newline yet) is skipped; a missing file
    has no events.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    for line in lines:
        if not line.endswith("\n"):
            break
        record = json.loads(line)
        if event is None or record["event"] == event:
            yield record


def read_events(path: str | os.PathLike, event: Event | None = None) -> list[dict[str, Any]]:
    """`iter_events` as a list."""
    return list(iter_events(path, event))
