"""W worker processes that compute inverse roots, fed by one dispatcher thread.

The processes are `worker_process.WorkerProcess`es. Matrices cross through each
one's shared memory buffer: the dispatcher writes the statistic there as float64
(the float32 -> float64 cast and the copy are one pass), the worker writes the root
over it, the dispatcher copies it out. Only the small records of `worker_protocol`
go through the socket. Memory held: one buffer of the largest n*n*8 bytes per worker.

A dispatcher that keeps failing (a bug) backs off, and after
FAILURES_BEFORE_NOT_SERVING failures in a row reports the pool not serving (the
server turns health NOT_SERVING) until it works again.

A worker that dies (or runs past `job_timeout_s`, and is killed) is replaced; its
job is reported failed and dropped, not requeued: a statistic that kills a worker
would kill the next one too, and the trainer pushes a newer one soon anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import connection

import numpy as np

from precond_service.common.auth import run_digest
from precond_service.common.events import Event, EventLog
from precond_service.server.scheduler import Job
from precond_service.server.worker_process import WorkerProcess, stop_workers
from precond_service.worker.protocol import Compute, Done, Ready, RootOutcome, SolverOptions

logger = logging.getLogger(__name__)

# Longest wait between attempts to replace a worker that keeps failing to start.
_MAX_RESPAWN_DELAY_S = 30.0

# Dispatcher failures in a row after which the pool reports itself not serving, and
# the first and longest waits between them.
FAILURES_BEFORE_NOT_SERVING = 3
_FAILURE_BACKOFF_S = 0.1
_MAX_FAILURE_BACKOFF_S = 5.0

# Longest wait for work while failing, so that recovery is noticed without a wakeup.
_FAILING_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class JobResult:
    """The outcome of one job.

    Attributes:
        job: The job.
        outcome: How computing its root went (`outcome.ok`: publishable).
        root: Read-only [n, n] float64 root when `outcome.ok`, else None.
    """

    job: Job
    outcome: RootOutcome
    root: np.ndarray | None = None


class WorkerPool:
    """Runs jobs taken from a callback on W worker processes.

    The dispatcher thread asks `take_job` for work whenever a worker is free and
    hands each outcome to `on_result` (both are called from that thread only).
    """

    def __init__(
        self,
        num_workers: int,
        solver: SolverOptions,
        *,
        take_job: Callable[[], Job | None],
        on_result: Callable[[JobResult], None],
        threads_per_worker: int = 1,
        job_timeout_s: float = 0.0,
        start_timeout_s: float = 120.0,
        on_serving: Callable[[bool], None] | None = None,
        events: EventLog | None = None,
    ) -> None:
        """Creates a pool; `start` launches the processes.

        Args:
            num_workers: Worker processes W, >= 1.
            solver: How roots are computed.
            take_job: Returns the next job, or None when there is none.
            on_result: Receives every job's outcome, failures included.
            threads_per_worker: BLAS threads per worker (>= 1).
            job_timeout_s: A job running longer than this is failed and its worker
                killed and replaced; 0 means no limit.
            start_timeout_s: How long `start` waits for the workers to be ready.
            on_serving: Called from the dispatcher thread with False once it has
                failed FAILURES_BEFORE_NOT_SERVING times in a row, and with True
                when it works again.
            events: Where WORKER_RESTARTED and DISPATCHER_FAILING are written.

        The counts and times are those of a `ServiceConfig`, which checks them.
        """
        self._num_workers = num_workers
        self._solver = solver
        self._take_job = take_job
        self._on_result = on_result
        self._threads_per_worker = threads_per_worker
        self._job_timeout_s = job_timeout_s
        self._start_timeout_s = start_timeout_s
        self._workers: list[WorkerProcess] = []
        self._restarts = 0
        self._respawn_failures = 0
        self._respawn_at = 0.0
        self._next_job_id = 0
        self._stopping = threading.Event()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._thread: threading.Thread | None = None
        self._on_serving = on_serving
        self._events = events or EventLog(None)
        self._failures_in_a_row = 0

    # Public interface, any thread.

    def start(self) -> None:
        """Starts the workers, waits until all are ready, starts dispatching.

        Raises:
            RuntimeError: If a worker is not ready within `start_timeout_s`.
        """
        deadline = time.monotonic() + self._start_timeout_s
        self._workers = [
            WorkerProcess.spawn(self._threads_per_worker) for _ in range(self._num_workers)
        ]
        for worker in self._workers:
            remaining = max(0.0, deadline - time.monotonic())
            if not (worker.conn.poll(remaining) and self._receive(worker) and worker.ready):
                stop_workers(self._workers, timeout_s=1.0)
                self._workers = []
                raise RuntimeError(
                    f"worker process {worker.process.pid} was not ready within "
                    f"{self._start_timeout_s} s; see its error output above"
                )
        self._thread = threading.Thread(target=self._run, name="precond-dispatcher", daemon=True)
        self._thread.start()
        logger.info(
            "started %d worker processes (pids %s), %d BLAS thread(s) each",
            self._num_workers,
            self.pids(),
            self._threads_per_worker,
        )

    def notify(self) -> None:
        """Tells the dispatcher that a job may be waiting."""
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # Already woken (buffer full) or stopped.

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops dispatching and the workers; jobs being computed are abandoned.

        Args:
            timeout_s: How long workers get to exit before they are killed.
        """
        self._stopping.set()
        self.notify()
        if self._thread is not None:
            self._thread.join()
        workers, self._workers = self._workers, []
        stop_workers(workers, timeout_s)
        self._wake_reader.close()
        self._wake_writer.close()

    def pids(self) -> list[int]:
        """Returns the process ids of the live workers."""
        return [w.process.pid for w in list(self._workers) if w.process.poll() is None]

    @property
    def alive(self) -> int:
        """Workers running now."""
        return len(self.pids())

    @property
    def busy(self) -> int:
        """Workers computing a job now."""
        return sum(1 for w in list(self._workers) if w.job is not None)

    @property
    def restarts(self) -> int:
        """Workers replaced after they died or timed out."""
        return self._restarts

    # Dispatcher thread.

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._respawn_missing()
                self._dispatch()
                conns = [w.conn for w in self._workers]
                ready = connection.wait([self._wake_reader, *conns], timeout=self._wait_timeout())
                for obj in ready:
                    if obj is self._wake_reader:
                        self._drain_wakeups()
                    else:
                        self._receive(next(w for w in self._workers if w.conn is obj))
                self._kill_overdue()
            except Exception as e:  # The dispatcher must survive any bug.
                self._dispatcher_failed(e)
                continue
            self._dispatcher_worked()

    def _dispatcher_failed(self, error: Exception) -> None:
        """Logs the first failure of a run of them, reports the pool failing, backs off."""
        self._failures_in_a_row += 1
        failures = self._failures_in_a_row
        if failures == 1:
            logger.exception("dispatcher error; retrying with backoff")
        if failures == FAILURES_BEFORE_NOT_SERVING:
            logger.error(
                "dispatcher failed %d times in a row (latest: %r); reporting NOT_SERVING until "
                "it works again",
                failures,
                error,
            )
            self._events.write(
                Event.DISPATCHER_FAILING, error=repr(error), failures_in_a_row=failures
            )
            self._report_serving(False)
        delay = min(_MAX_FAILURE_BACKOFF_S, _FAILURE_BACKOFF_S * 2 ** (failures - 1))
        self._stopping.wait(delay)

    def _dispatcher_worked(self) -> None:
        """Ends a run of failures; reports the pool serving again if it was not."""
        if self._failures_in_a_row >= FAILURES_BEFORE_NOT_SERVING:
            logger.info(
                "dispatcher works again after %d failures; reporting SERVING",
                self._failures_in_a_row,
            )
            self._report_serving(True)
        self._failures_in_a_row = 0

    def _report_serving(self, serving: bool) -> None:
        if self._on_serving is None:
            return
        try:
            self._on_serving(serving)
        except Exception:  # A bug there must not stop the dispatcher.
            logger.exception("on_serving(%s) failed", serving)

    def _wait_timeout(self) -> float | None:
        deadlines = []
        if self._failures_in_a_row:
            deadlines.append(time.monotonic() + _FAILING_POLL_S)
        if len(self._workers) < self._num_workers:
            deadlines.append(self._respawn_at)
        if self._job_timeout_s:
            deadlines += [
                w.job_started + self._job_timeout_s for w in self._workers if w.job is not None
            ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _dispatch(self) -> None:
        for worker in list(self._workers):
            if not worker.ready or worker.job is not None:
                continue
            job = self._take_job()
            if job is None:
                return
            try:
                self._send(worker, job)
            except (OSError, ValueError) as e:
                self._retire(worker, f"could not send a job to worker {worker.process.pid}: {e}")

    def _send(self, worker: WorkerProcess, job: Job) -> None:
        self._next_job_id += 1
        worker.job, worker.job_id, worker.job_started = job, self._next_job_id, time.monotonic()
        worker.write_statistic(job.matrix)
        options = dataclasses.replace(self._solver, **job.settings.overrides())
        worker.conn.send(Compute(worker.job_id, job.matrix.shape[0], job.exponent, options))

    def _receive(self, worker: WorkerProcess) -> bool:
        """Handles one message from a worker; returns False if the worker is gone."""
        try:
            message: Ready | Done = worker.conn.recv()
        except (EOFError, OSError):
            self._retire(worker, f"worker process {worker.process.pid} exited")
            return False
        if isinstance(message, Ready):
            worker.ready = True
            self._respawn_failures = 0
            return True
        job = worker.job
        if job is None or message.job_id != worker.job_id:
            logger.error(
                "worker %d answered job %d it was not given", worker.process.pid, message.job_id
            )
            return True
        worker.job = None
        root = worker.read_root(job.matrix.shape[0]) if message.outcome.ok else None
        worker.release_large_buffer()
        self._report(JobResult(job, message.outcome, root))
        return True

    def _report(self, result: JobResult) -> None:
        try:
            self._on_result(result)
        except Exception:  # A bug there must not stop the dispatcher.
            logger.exception(
                "on_result failed for run %s key %r", run_digest(result.job.run_id), result.job.key
            )

    def _kill_overdue(self) -> None:
        if not self._job_timeout_s:
            return
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job is not None and now - worker.job_started > self._job_timeout_s:
                worker.process.kill()
                self._retire(
                    worker,
                    f"worker process {worker.process.pid} ran past job_timeout_s="
                    f"{self._job_timeout_s} and was killed",
                )

    def _retire(self, worker: WorkerProcess, reason: str) -> None:
        """Removes a dead or doomed worker, failing its job; a new one replaces it."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        if worker.process.poll() is None:
            worker.process.kill()
        exit_code = worker.process.wait()
        if worker.job is not None:
            reason = f"{reason} (exit code {exit_code}) while computing"
            logger.warning(
                "%s run %s key %r step %d",
                reason,
                run_digest(worker.job.run_id),
                worker.job.key,
                worker.job.step,
            )
            self._report(JobResult(worker.job, RootOutcome(ok=False, reason=reason)))
        else:
            logger.warning("%s (exit code %d)", reason, exit_code)
        if not worker.ready:
            self._respawn_failures += 1
        worker.close()
        if not self._stopping.is_set():
            self._events.write(Event.WORKER_RESTARTED, pid=worker.process.pid, reason=reason)
            delay = min(_MAX_RESPAWN_DELAY_S, 0.5 * (2**self._respawn_failures - 1))
            self._respawn_at = time.monotonic() + delay
            self._restarts += 1

    def _respawn_missing(self) -> None:
        while len(self._workers) < self._num_workers and time.monotonic() >= self._respawn_at:
            try:
                self._workers.append(WorkerProcess.spawn(self._threads_per_worker))
            except OSError:
                logger.exception("could not start a worker process")
                self._respawn_failures += 1
                self._respawn_at = time.monotonic() + _MAX_RESPAWN_DELAY_S
                return
