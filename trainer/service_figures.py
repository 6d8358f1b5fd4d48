"""The service's own figures for TensorBoard: GetStatus, fetched off the training loop.

At the summary cadence the trainer writes what the service(s) last reported:
`service/queue_depth` (jobs waiting for a worker) and `service/in_flight`,
`service/compute_ms_mean` (mean solver time over the jobs computed so far) and
`service/compute_ms_p50`, `service/compute_ms_p95` (over the last 1024 jobs),
`service/memory_held_mb` against `service/memory_budget_mb`
(`service/memory_used_fraction`), and the failures: `service/roots_failed`,
`service/blocks_rejected`, `service/memory_refused`, `service/worker_restarts`.
Over shards, counts and bytes are summed and the compute time is the mean
weighted by roots published; the percentiles are the slowest shard's. A summary
writes what the fetch started at
the previous summary brought back, so the training loop never waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from precond_service.client import Client

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class ServiceStatusPoller:
    """Fetches the services' GetStatus on a thread of its own; `latest` never waits.

    Args:
        client: The run's client (`service_statuses` of each service it talks to).
        timeout_s: Deadline of one fetch.
    """

    def __init__(self, client: Client, timeout_s: float = 5.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._statuses: list[Any] | None = None
        self._thread: threading.Thread | None = None

    def latest(self) -> list[Any] | None:
        """The statuses of the last fetch that succeeded (None before any), and fetches anew."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._fetch, name="precond-status", daemon=True
                )
                self._thread.start()
            return self._statuses

    def wait(self, timeout_s: float = 10.0) -> None:
        """Waits for the fetch in flight, if any (tests, the last summary)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _fetch(self) -> None:
        try:
            statuses = self._client.service_statuses(self._timeout_s)
        except Exception as e:  # noqa: BLE001 - a summary goes without; training goes on
            log.debug("GetStatus from %s failed: %s", self._client.address, e)
            return
        with self._lock:
            self._statuses = statuses


def service_scalars(statuses: Sequence[Any]) -> dict[str, float | None]:
    """TensorBoard scalars from the GetStatus replies of a run's services (see module doc)."""
    published = sum(s.published for s in statuses)
    held = sum(s.memory_held_bytes for s in statuses)
    budget = sum(s.memory_budget_bytes for s in statuses)
    compute_s = (
        sum(s.mean_compute_seconds * s.published for s in statuses) / published
        if published
        else None
    )
    return {
        "service/queue_depth": sum(s.queue_depth for s in statuses),
        "service/in_flight": sum(s.in_flight for s in statuses),
        "service/compute_ms_mean": None if compute_s is None else 1000 * compute_s,
        # Percentiles do not add over shards: the slowest shard's.
        "service/compute_ms_p50": 1000 * max((s.compute_seconds_p50 for s in statuses), default=0),
        "service/compute_ms_p95": 1000 * max((s.compute_seconds_p95 for s in statuses), default=0),
        "service/memory_held_mb": held / MIB,
        "service/memory_budget_mb": budget / MIB,
        "service/memory_used_fraction": held / budget if budget else None,
        "service/roots_published": published,
        "service/roots_failed": sum(s.failed for s in statuses),
        "service/blocks_rejected": sum(s.rejected for s in statuses),
        "service/memory_refused": sum(s.memory_refused for s in statuses),
        "service/worker_restarts": sum(s.worker_restarts for s in statuses),
    }
