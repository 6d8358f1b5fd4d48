"""Decides which statistic a free worker computes next.

Per (run_id, key) the scheduler keeps at most one pending statistic, the newest:
a newer one replaces a pending older one (coalescing: the trainer only ever needs
the newest root), and one older than what is pending, being computed or published
is rejected as stale. An exact repeat of the newest step is accepted without being
computed again, so a client may safely resend after a broken connection.

A free worker gets the pending block whose published root is stalest: blocks that
have no root yet first (oldest arrival first), then the largest lag
`pending step - published step`, ties going to the earliest arrival.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import threading

import numpy as np

from precond_service.common.root_settings import RootSettings
from precond_service.common.versions import is_newer, newest
from precond_service.server.budget import ByteBudget


class StaleError(ValueError):
    """A statistic is older than one the scheduler already has for its key."""


class CapacityError(ValueError):
    """The scheduler holds as many blocks as it is allowed to."""


class Outcome(enum.Enum):
    """What `Scheduler.submit` did with an accepted statistic."""

    QUEUED = "queued"
    # Queued, replacing an older pending statistic of the same key.
    COALESCED = "coalesced"
    # Same step as the newest pending, computing or published one: nothing to do.
    DUPLICATE = "duplicate"


@dataclasses.dataclass
class _BlockState:
    """Where one (run_id, key) stands; guarded by the scheduler's lock."""

    pending: Job | None = None
    computing_step: int | None = None
    published_step: int | None = None
    # Budget held for the key's float64 root, from its first statistic on (the
    # store holds one root per key), until the run is dropped.
    root_bytes: int = 0

    def newest_step(self) -> int | None:
        pending = None if self.pending is None else self.pending.step
        return newest(pending, self.computing_step, self.published_step)


@dataclasses.dataclass(eq=False)
class Job:
    """One statistic to compute.

    Attributes:
        run_id: Run it belongs to.
        key: Block key.
        step: Step of the statistic.
        exponent: p of the inverse p-th root.
        matrix: Square float32 or float64 statistic (read-only).
        settings: The statistic's own root settings (None: the service's flags).
        sequence: Arrival order, for ties.
    """

    run_id: str
    key: str
    step: int
    exponent: int
    matrix: np.ndarray
    settings: RootSettings = RootSettings()
    sequence: int = 0
    state: _BlockState | None = dataclasses.field(default=None, repr=False)


class Scheduler:
    """Thread-safe newest-only queue of statistics, served stalest first."""

    def __init__(
        self,
        max_blocks: int,
        *,
        max_blocks_per_run: int | None = None,
        max_runs: int | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        """Creates an empty scheduler.

        Args:
            max_blocks: Most (run_id, key) pairs held over all runs; a statistic for
                a new key beyond that is rejected.
            max_blocks_per_run: Most keys held for one run; None: max_blocks.
            max_runs: Most runs held; a statistic for a new run beyond that is
                rejected. None: no limit besides max_blocks.
            budget: Holds the statistics, pending or being computed, until they are
                replaced, finished or dropped, and each key's float64 root (published
                or to come) until its run is dropped; a statistic that does not fit
                is refused. None counts nothing.

        The limits are those of a `ServiceConfig`, which checks them (each >= 1).
        """
        self._max_blocks = max_blocks
        self._max_blocks_per_run = max_blocks_per_run or max_blocks
        self._max_runs = max_runs
        self._lock = threading.Lock()
        # run_id -> key -> state; a run is here while it holds a key.
        self._runs: dict[str, dict[str, _BlockState]] = {}
        self._block_count = 0
        self._pending: dict[tuple[str, str], _BlockState] = {}
        self._sequence = itertools.count()
        self._budget = budget or ByteBudget(1 << 62)

    def submit(self, job: Job, *, paid_bytes: int = 0) -> Outcome:
        """Queues a statistic unless it is stale or does not fit in the budget.

        The budget must hold the statistic and its key's float64 root beside
        everything else (the statistic it replaces, if any, is released).

        Args:
            job: The statistic; its `sequence` and `state` are set here.
            paid_bytes: Budget already reserved for `job.matrix` (a statistic sent in
                chunks): kept with it when it is queued, released otherwise.

        Returns:
            What happened to it.

        Raises:
            StaleError: If its step is older than the newest step pending, being
                computed or published for its key.
            CapacityError: If its key is new and the scheduler, its run, or the
                number of runs is at its limit.
            BudgetExceededError: If it does not fit in the budget.
        """
        try:
            outcome = self._submit(job, paid_bytes)
        except Exception:
            self._budget.release(paid_bytes)
            raise
        if outcome is Outcome.DUPLICATE:
            self._budget.release(paid_bytes)
        return outcome

    def _submit(self, job: Job, paid_bytes: int) -> Outcome:
        ident = (job.run_id, job.key)
        with self._lock:
            run = self._runs.get(job.run_id)
            state = None if run is None else run.get(job.key)
            if state is None:
                self._check_room(run)
                state = _BlockState()
            held = state.newest_step()
            if not is_newer(job.step, held):
                if job.step == held:
                    return Outcome.DUPLICATE
                raise StaleError(
                    f"stale: step {job.step} is older than step {held} already "
                    f"{self._describe(state, held)} for this key"
                )
            root_bytes = max(state.root_bytes, job.matrix.shape[0] ** 2 * 8)
            replaced = 0 if state.pending is None else state.pending.matrix.nbytes
            more = job.matrix.nbytes - paid_bytes + root_bytes - state.root_bytes - replaced
            if more > 0:
                self._budget.reserve(more, "this statistic and its float64 root")
            else:
                self._budget.release(-more)
            state.root_bytes = root_bytes
            if run is None:
                run = self._runs[job.run_id] = {}
            if job.key not in run:
                run[job.key] = state
                self._block_count += 1
            outcome = Outcome.QUEUED if state.pending is None else Outcome.COALESCED
            job.sequence = next(self._sequence)
            job.state = state
            state.pending = job
            self._pending[ident] = state
            return outcome

    def take(self) -> Job | None:
        """Removes and returns the pending statistic to compute next.

        Returns:
            The job whose key's published root is stalest, or None if nothing is
            pending. Its key counts as being computed until `finish`.
        """
        with self._lock:
            best_ident, best_rank = None, None
            for ident, state in self._pending.items():
                job = state.pending
                if state.published_step is None:
                    rank = (0, 0, job.sequence)
                else:
                    rank = (1, state.published_step - job.step, job.sequence)
                if best_rank is None or rank < best_rank:
                    best_ident, best_rank = ident, rank
            if best_ident is None:
                return None
            state = self._pending.pop(best_ident)
            job, state.pending = state.pending, None
            state.computing_step = job.step
            return job

    def finish(self, job: Job, *, published: bool) -> bool:
        """Records that a job taken with `take` is done (once per job taken).

        Args:
            job: The job.
            published: Whether its root was published.

        Returns:
            False if the job's run was dropped while it was being computed, in which
            case its root must not be published.
        """
        with self._lock:
            self._budget.release(job.matrix.nbytes)
            state = self._runs.get(job.run_id, {}).get(job.key)
            if state is not job.state:
                return False
            if state.computing_step == job.step:
                state.computing_step = None
            if published and is_newer(job.step, state.published_step):
                state.published_step = job.step
            return True

    def drop_run(self, run_id: str) -> int:
        """Forgets a run: its pending statistics go, its computing jobs are orphaned.

        Args:
            run_id: The run.

        Returns:
            How many keys the run had.
        """
        with self._lock:
            run = self._runs.pop(run_id, {})
            for key, state in run.items():
                self._pending.pop((run_id, key), None)
                self._budget.release(state.root_bytes)
                if state.pending is not None:
                    self._budget.release(state.pending.matrix.nbytes)
                # A pending job and its state refer to each other: break the cycle so
                # that its statistic is freed now, not when the cyclic collector runs.
                state.pending = None
            self._block_count -= len(run)
            return len(run)

    def queue_depth(self, run_id: str | None = None) -> int:
        """Returns how many keys have a pending statistic (in one run, or in all)."""
        with self._lock:
            if run_id is None:
                return len(self._pending)
            run = self._runs.get(run_id, {})
            return sum(1 for state in run.values() if state.pending is not None)

    def blocks_known(self, run_id: str | None = None) -> int:
        """Returns how many keys are held (in one run, or in all)."""
        with self._lock:
            if run_id is None:
                return self._block_count
            return len(self._runs.get(run_id, {}))

    def runs_known(self) -> int:
        """Returns how many runs hold at least one key."""
        with self._lock:
            return len(self._runs)

    def _check_room(self, run: dict[str, _BlockState] | None) -> None:
        """Raises CapacityError unless a new key fits (in `run`, or a new run if None)."""
        if self._block_count >= self._max_blocks:
            raise CapacityError(
                f"the service already holds max_blocks={self._max_blocks} blocks; drop "
                "finished runs (DropRun) or start it with a larger --max_blocks"
            )
        if run is None and self._max_runs is not None and len(self._runs) >= self._max_runs:
            raise CapacityError(
                f"the service already holds max_runs={self._max_runs} runs, and this is a new "
                "one; drop finished runs (DropRun) or start it with a larger --max_runs"
            )
        if run is not None and len(run) >= self._max_blocks_per_run:
            raise CapacityError(
                f"this run already holds max_blocks_per_run={self._max_blocks_per_run} blocks, "
                "and this key is a new one (its existing keys still update); use fewer blocks "
                "or start the service with a larger --max_blocks_per_run"
            )

    @staticmethod
    def _describe(state: _BlockState, step: int) -> str:
        if state.pending is not None and state.pending.step == step:
            return "pending"
        if state.computing_step == step:
            return "being computed"
        return "published"
