# Over 400 lines: RootService is the one object joining scheduler, pool, store and figures.
"""The preconditioner service without the network: validate, queue, compute, publish.

`RootService` ties together the scheduler (newest-only queue, stalest first), the
worker pool (float64 roots in W processes) and the versioned store (newest root per
key), and keeps the counters that `GetStatus` reports. The gRPC servicer
(`servicer.py`) only translates messages to and from calls on it, so everything here
can be tested without a network.

Memory is bounded whatever clients send: bytes by the `budget.ByteBudget` of
`--memory_budget_mb`, keys, runs and per-run figures by the `max_*` limits of
`ServiceConfig`; runs idle for `--run_ttl_s` are dropped; rejections are counted,
never kept, and failed roots kept per key only until a newer root (both logged at
most once per `_LOG_INTERVAL_S`); runs are named in the status and the logs by
`auth.run_digest`, never by run_id.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping

from precond_service.common.auth import run_digest
from precond_service.common.blocks import RootFailure
from precond_service.common.events import Event, EventLog
from precond_service.server import validation
from precond_service.server.budget import BudgetExceededError, ByteBudget
from precond_service.server.chunks import AssembledBlock
from precond_service.server.pool import JobResult, WorkerPool
from precond_service.server.scheduler import Job, Outcome, Scheduler
from precond_service.server.service_records import (
    Rejection,
    RunStatus,
    ServiceConfig,
    ServiceStatus,
    Totals,
)
from precond_service.server.store import PublishedRoot, VersionedStore
from precond_service.server.throttle import Throttle
from precond_service.worker.protocol import SolverOptions
from protos import precond_service_pb2 as pb

logger = logging.getLogger(__name__)

# Rejected blocks, and roots not published, are logged in one line per this many
# seconds at most, with a count.
_LOG_INTERVAL_S = 10.0
# Jobs whose solver times the status's percentiles are taken over.
_RECENT_JOBS = 1024

# Characters of a client-supplied key or reason that go into a log line.
_LOGGED_CHARACTERS = 200


class RootService:
    """Validates statistics, computes their roots on worker processes, publishes them."""

    def __init__(self, config: ServiceConfig, events: EventLog | None = None) -> None:
        """Creates the service; `start` launches its workers.

        Args:
            config: The configuration.
            events: Where the service's events go (WORKER_RESTARTED, RUN_DROPPED,
                DISPATCHER_FAILING); None writes none.
        """
        self.config = config
        self.events = events or EventLog(None)
        self._serving_listeners: list[Callable[[bool], None]] = []
        self.incarnation = uuid.uuid4().hex
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._totals = Totals()
        self._recent_compute_seconds: collections.deque[float] = collections.deque(
            maxlen=_RECENT_JOBS
        )
        # run_id -> its figures; a run is here once a block of it was accepted.
        self._runs: dict[str, RunStatus] = {}
        # run_id -> time.monotonic() of its last push or pull.
        self._last_active: dict[str, float] = {}
        self._stop_expiry = threading.Event()
        self._rejections_to_log = Throttle(_LOG_INTERVAL_S)
        self._failures_to_log = Throttle(_LOG_INTERVAL_S)
        self.budget = ByteBudget(config.memory_budget_mb << 20)
        self._scheduler = Scheduler(
            config.max_blocks,
            max_blocks_per_run=config.max_blocks_per_run,
            max_runs=config.max_runs,
            budget=self.budget,
        )
        self._store = VersionedStore()
        self._pool = WorkerPool(
            config.workers,
            SolverOptions(
                method=config.method,
                ridge_epsilon=config.ridge_epsilon,
                ridge_mode=config.ridge_mode,
                failure_threshold=config.failure_threshold,
                max_iterations=config.max_iterations,
                symmetry_tolerance=validation.SYMMETRY_TOLERANCE,
            ),
            take_job=self._scheduler.take,
            on_result=self._on_result,
            threads_per_worker=config.threads_per_worker,
            job_timeout_s=config.job_timeout_s,
            on_serving=self._serving_changed,
            events=self.events,
        )

    def start(self) -> None:
        """Starts the worker processes and waits until they are ready.

        Raises:
            RuntimeError: If the workers do not start.
        """
        self._pool.start()
        threading.Thread(target=self._expire_runs, name="precond-run-expiry", daemon=True).start()

    def _expire_runs(self) -> None:
        """Drops runs idle for `run_ttl_s`, looking 4 times per TTL (at least every 30 s)."""
        while not self._stop_expiry.wait(min(self.config.run_ttl_s / 4, 30.0)):
            self.expire_idle_runs()

    def expire_idle_runs(self) -> int:
        """Drops every run with no push or pull for `run_ttl_s`; returns how many."""
        horizon = time.monotonic() - self.config.run_ttl_s
        with self._lock:
            idle = [run_id for run_id, last in self._last_active.items() if last < horizon]
        for run_id in idle:
            self._drop(run_id, reason="expired")
        return len(idle)

    def add_serving_listener(self, listener: Callable[[bool], None]) -> None:
        """Calls `listener(False)` when the service cannot compute roots, `(True)` once it can.

        The dispatcher reports not serving after it failed
        `pool.FAILURES_BEFORE_NOT_SERVING` times in a row; the server turns health
        NOT_SERVING then. Listeners run on the dispatcher thread and must be quick.
        """
        self._serving_listeners.append(listener)

    def _serving_changed(self, serving: bool) -> None:
        for listener in list(self._serving_listeners):
            listener(serving)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the workers; roots being computed are abandoned.

        Args:
            timeout_s: How long workers get to exit before they are killed.
        """
        self._stop_expiry.set()
        self._pool.stop(timeout_s)

    def push(
        self, run_id: str, blocks: Iterable[pb.BlockStatistics | AssembledBlock | Rejection]
    ) -> tuple[int, list[Rejection]]:
        """Validates statistics and queues the good ones, if they fit in the byte budget.

        Args:
            run_id: Run they belong to.
            blocks: The statistics as received, or reassembled from chunks (their
                reserved bytes go to the scheduler, or are released), and the
                rejections of statistics whose chunks did not all arrive, counted here.

        Returns:
            (number accepted, rejections with reasons). A rejection names its key
            as received, cut to `validation.MAX_KEY_LENGTH` characters.

        Raises:
            BudgetExceededError: If a statistic and its root do not fit in the byte
                budget; the statistics before it stay accepted, those after it are
                not looked at (the client pushes again later).
        """
        accepted, rejections, queued = 0, [], False
        try:
            validation.check_run_id(run_id, max_length=self.config.max_run_id_length)
            run_error = ""
        except ValueError as e:
            run_error = str(e)
        for item in blocks:
            if isinstance(item, Rejection):  # Found before (`chunks.ChunkAssembler`).
                rejections.append(item)
                with self._lock:
                    self._count(run_id, item.step, rejected=1)
                continue
            message, matrix, paid = (
                (item.header, item.matrix, item.paid_bytes)
                if isinstance(item, AssembledBlock)
                else (item, None, 0)
            )
            try:
                if run_error:
                    raise ValueError(run_error)
                block = validation.decode_block(
                    message, max_matrix_size=self.config.max_matrix_size, matrix=matrix
                )
                job = Job(
                    run_id, block.key, block.step, block.exponent, block.matrix, block.settings
                )
                with self._lock:  # With the count, so that a DropRun cannot come between.
                    paid, paying = 0, paid  # `submit` keeps or releases them.
                    outcome = self._scheduler.submit(job, paid_bytes=paying)
                    self._count(
                        run_id,
                        block.step,
                        accepted=1,
                        coalesced=int(outcome is Outcome.COALESCED),
                    )
            except BudgetExceededError:
                self.budget.release(paid)
                raise
            except ValueError as e:
                self.budget.release(paid)
                key = message.key[: validation.MAX_KEY_LENGTH]
                rejections.append(Rejection(key, message.step, str(e)))
                with self._lock:
                    self._count(run_id, message.step, rejected=1)
                continue
            accepted += 1
            queued = queued or outcome is not Outcome.DUPLICATE
        if queued:
            self._pool.notify()
        count = self._rejections_to_log.add(len(rejections)) if rejections else 0
        if count:
            logger.info(
                "rejected %d block(s) since the last report; latest: run %s key %r: %s",
                count,
                run_digest(run_id),
                rejections[-1].key[:_LOGGED_CHARACTERS],
                rejections[-1].reason[:_LOGGED_CHARACTERS],
            )
        return accepted, rejections

    def preconditioners(
        self, run_id: str, known_steps: Mapping[str, int]
    ) -> tuple[list[PublishedRoot], list[RootFailure]]:
        """Returns the published roots, and failed ones, of a run newer than the client holds.

        Args:
            run_id: The run.
            known_steps: key -> stats_step the client holds.

        Returns:
            (roots, failures): roots with a larger stats_step than `known_steps`
            says (all for keys it does not list), and the failures of roots newer
            than those, each for a key with no root at or after its step.

        Raises:
            wire.RequestTooLargeError: If known_steps has more than
                `max_blocks_per_request` entries.
            ValueError: If the run_id or a key of known_steps is empty or too long.
        """
        validation.check_run_id(run_id, max_length=self.config.max_run_id_length)
        validation.check_known_steps(known_steps, max_entries=self.config.max_blocks_per_request)
        with self._lock:
            if run_id in self._last_active:
                self._last_active[run_id] = time.monotonic()
        return (
            self._store.newer_than(run_id, known_steps),
            self._store.failures_newer_than(run_id, known_steps),
        )

    def drop_run(self, run_id: str) -> int:
        """Releases everything held for a run; roots being computed for it are dropped.

        Args:
            run_id: The run.

        Returns:
            How many blocks (keys) were released.

        Raises:
            ValueError: If the run_id is empty or too long.
        """
        validation.check_run_id(run_id, max_length=self.config.max_run_id_length)
        return self._drop(run_id, reason="client")

    def drop_run_by_digest(self, digest: str) -> int:
        """Releases everything held for the run whose `auth.run_digest` is `digest`.

        Args:
            digest: The digest GetStatus shows.

        Returns:
            How many blocks (keys) were released; 0 if no run has that digest.

        Raises:
            ValueError: If `digest` is not 12 lowercase hex digits.
        """
        validation.check_run_digest(digest)
        with self._lock:
            matching = [run_id for run_id in self._runs if run_digest(run_id) == digest]
        return sum(self._drop(run_id, reason="operator") for run_id in matching)

    def _drop(self, run_id: str, reason: str) -> int:
        """Releases a run; returns how many blocks. `reason`: "client", "operator", "expired"."""
        with self._lock:
            released = self._scheduler.drop_run(run_id)
            self._store.drop_run(run_id)
            self._runs.pop(run_id, None)
            self._last_active.pop(run_id, None)
        if released:
            logger.info(
                "dropped run %s (%s): released %d blocks", run_digest(run_id), reason, released
            )
            self.events.write(
                Event.RUN_DROPPED,
                run_digest=run_digest(run_id),
                blocks_released=released,
                reason=reason,
            )
        return released

    def status(self, run_id: str = "") -> ServiceStatus:
        """Returns the service's figures.

        Args:
            run_id: When set, only this run is listed in `runs`.

        Returns:
            The status; runs are named by their digest, sorted by it.

        Raises:
            ValueError: If the run_id is longer than `max_run_id_length`.
        """
        if run_id:
            validation.check_run_id(run_id, max_length=self.config.max_run_id_length)
        with self._lock:
            totals = dataclasses.replace(self._totals)
            runs = [
                (held_id, dataclasses.replace(r))
                for held_id, r in self._runs.items()
                if not run_id or held_id == run_id
            ]
        for held_id, run in runs:
            steps = self._store.steps(held_id)
            run.blocks_known = self._scheduler.blocks_known(held_id)
            run.blocks_published = len(steps)
            run.pending = self._scheduler.queue_depth(held_id)
            run.max_staleness_steps = max(
                (run.latest_step - step for step in steps.values()), default=0
            )
        return ServiceStatus(
            incarnation=self.incarnation,
            uptime_seconds=time.monotonic() - self._started,
            workers=self.config.workers,
            workers_alive=self._pool.alive,
            worker_restarts=self._pool.restarts,
            queue_depth=self._scheduler.queue_depth(),
            in_flight=self._pool.busy,
            blocks_known=self._scheduler.blocks_known(),
            received=totals.received,
            accepted=totals.accepted,
            rejected=totals.rejected,
            coalesced=totals.coalesced,
            published=totals.published,
            failed=totals.failed,
            method=self.config.method,
            max_matrix_size=self.config.max_matrix_size,
            runs=sorted((run for _, run in runs), key=lambda r: r.run_digest),
            worker_pids=self._pool.pids(),
            mean_compute_seconds=(
                totals.compute_seconds / totals.computed if totals.computed else 0.0
            ),
            memory_held_bytes=self.budget.held_bytes,
            memory_budget_bytes=self.budget.capacity_bytes,
            memory_refused=self.budget.refused,
            compute_seconds_p50=_quantile(self._recent_compute_seconds, 0.5),
            compute_seconds_p95=_quantile(self._recent_compute_seconds, 0.95),
        )

    def _count(
        self, run_id: str, step: int, *, accepted: int = 0, rejected: int = 0, coalesced: int = 0
    ) -> None:
        """Adds to the totals and, for a run with accepted blocks, to its figures.

        The caller holds the lock.
        """
        for counters in (self._totals, self._runs.get(run_id)):
            if counters is None:
                if not accepted:
                    continue  # Runs exist once something was accepted for them.
                counters = self._runs[run_id] = RunStatus(run_digest=run_digest(run_id))
            counters.received += 1
            counters.accepted += accepted
            counters.rejected += rejected
            counters.coalesced += coalesced
        run = self._runs.get(run_id)
        if run is not None:
            self._last_active[run_id] = time.monotonic()
            if accepted:  # A rejected block's step may be anything.
                run.latest_step = max(run.latest_step, step)
            run.last_push_unix_time = time.time()

    def _on_result(self, result: JobResult) -> None:
        """Publishes a computed root, or counts and logs the failure (dispatcher thread)."""
        job, outcome = result.job, result.outcome
        with self._lock:
            if outcome.compute_seconds:
                self._totals.computed += 1
                self._totals.compute_seconds += outcome.compute_seconds
                self._recent_compute_seconds.append(outcome.compute_seconds)
            if not self._scheduler.finish(job, published=outcome.ok):
                return  # The run was dropped while its root was being computed.
            run = self._runs.get(job.run_id)
            if outcome.ok:
                result.root.flags.writeable = False
                self._store.publish(
                    job.run_id,
                    PublishedRoot(
                        key=job.key,
                        stats_step=job.step,
                        root=result.root,
                        error=outcome.error,
                        iterations=outcome.iterations,
                        method=outcome.method,
                        compute_seconds=outcome.compute_seconds,
                        ridge_epsilon=outcome.ridge_epsilon,
                        published_unix_time=time.time(),
                    ),
                )
            else:
                reason = outcome.reason[:_LOGGED_CHARACTERS]
                self._store.fail(job.run_id, RootFailure(job.key, job.step, reason))
            for counters in (self._totals, run):
                if counters is not None:
                    counters.published += int(outcome.ok)
                    counters.failed += int(not outcome.ok)
        count = 0 if outcome.ok else self._failures_to_log.add()
        if count:
            logger.warning(
                "%d root(s) not published since the last report, the previous ones stay; "
                "latest: run %s key %r step %d: %s",
                count,
                run_digest(job.run_id),
                job.key,
                job.step,
                outcome.reason[:_LOGGED_CHARACTERS],
            )


def _quantile(values: Iterable[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank), 0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
