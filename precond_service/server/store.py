"""The versioned store of published roots: per (run_id, key), the newest one only.

A root is published with the step of the statistic it came from (its version). A
root older than the one held is ignored, and the one it replaces is released, so the
store holds one root per key. A root that failed is recorded per key too (`fail`),
until a root at least as new is published; `drop_run` releases a whole run.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

import numpy as np

from precond_service.common.blocks import RootFailure
from precond_service.common.versions import is_newer


@dataclasses.dataclass(frozen=True)
class PublishedRoot:
    """One published inverse root and how it was made.

    Attributes:
        key: Block key.
        stats_step: Step of the statistic it was computed from (its version).
        root: Read-only [n, n] float64 root.
        error: Final solver residual.
        iterations: Solver iterations.
        method: Solver name.
        compute_seconds: Solver wall time in the worker.
        ridge_epsilon: Relative ridge the solver added.
        published_unix_time: Wall-clock time of publication.
    """

    key: str
    stats_step: int
    root: np.ndarray
    error: float
    iterations: int
    method: str
    compute_seconds: float
    ridge_epsilon: float
    published_unix_time: float


class VersionedStore:
    """Thread-safe map (run_id, key) -> newest PublishedRoot."""

    def __init__(self) -> None:
        """Creates an empty store.

        The byte budget holds each key's root from its first statistic on
        (`Scheduler.submit`), so publishing one never takes the service past it.
        """
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, PublishedRoot]] = {}
        self._failures: dict[str, dict[str, RootFailure]] = {}

    def publish(self, run_id: str, root: PublishedRoot) -> bool:
        """Stores a root unless one at least as new is held.

        Args:
            run_id: Run it belongs to.
            root: The root.

        Returns:
            Whether it was stored.
        """
        with self._lock:
            run = self._runs.setdefault(run_id, {})
            held = run.get(root.key)
            if held is not None and not is_newer(root.stats_step, held.stats_step):
                return False
            run[root.key] = root
            failures = self._failures.get(run_id, {})
            failed = failures.get(root.key)
            if failed is not None and not is_newer(failed.stats_step, root.stats_step):
                del failures[root.key]
            return True

    def fail(self, run_id: str, failure: RootFailure) -> bool:
        """Records that a root failed, unless a root or failure at least as new is held.

        Args:
            run_id: Run it belongs to.
            failure: The failure.

        Returns:
            Whether it was recorded.
        """
        with self._lock:
            held = self._runs.get(run_id, {}).get(failure.key)
            failures = self._failures.setdefault(run_id, {})
            failed = failures.get(failure.key)
            if held is not None and not is_newer(failure.stats_step, held.stats_step):
                return False
            if failed is not None and not is_newer(failure.stats_step, failed.stats_step):
                return False
            failures[failure.key] = failure
            return True

    def failures_newer_than(self, run_id: str, known_steps: Mapping[str, int]) -> list[RootFailure]:
        """Returns the failures of a run newer than the roots a client holds, in key order."""
        with self._lock:
            failures = dict(self._failures.get(run_id, {}))
        return [
            failure
            for key, failure in sorted(failures.items())
            if is_newer(failure.stats_step, known_steps.get(key))
        ]

    def newer_than(self, run_id: str, known_steps: Mapping[str, int]) -> list[PublishedRoot]:
        """Returns the roots of a run newer than what a client holds.

        Args:
            run_id: The run.
            known_steps: key -> stats_step the client holds; keys not listed count
                as not held.

        Returns:
            The roots whose stats_step is larger than `known_steps` says, in key order.
        """
        with self._lock:
            run = dict(self._runs.get(run_id, {}))
        return [
            root
            for key, root in sorted(run.items())
            if is_newer(root.stats_step, known_steps.get(key))
        ]

    def steps(self, run_id: str) -> dict[str, int]:
        """Returns key -> published stats_step for a run."""
        with self._lock:
            return {key: root.stats_step for key, root in self._runs.get(run_id, {}).items()}

    def drop_run(self, run_id: str) -> int:
        """Releases every root of a run.

        Args:
            run_id: The run.

        Returns:
            How many roots were released.
        """
        with self._lock:
            self._failures.pop(run_id, None)
            return len(self._runs.pop(run_id, {}))
