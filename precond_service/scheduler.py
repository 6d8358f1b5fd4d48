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

    def newest_step(self) -> int | None:
        steps = [s for s in (self.computing_step, self.published_step) if s is not None]
        if self.pending is not None:
            steps.append(self.pending.step)
        return max(steps) if steps else None


@dataclasses.dataclass(eq=False)
class Job:
    """One statistic to compute.

    Attributes:
        run_id: Run it belongs to.
        key: Block key.
        step: Step of the statistic.
        exponent: p of the inverse p-th root.
        matrix: Square float32 or float64 statistic (read-only).
        sequence: Arrival order, for ties.
    """

    run_id: str
    key: str
    step: int
    exponent: int
    matrix: np.ndarray
    sequence: int = 0
    state: _BlockState | None = dataclasses.field(default=None, repr=False)


class Scheduler:
    """Thread-safe newest-only queue of statistics, served stalest first."""

    def __init__(self, max_blocks: int) -> None:
        """Creates an empty scheduler.

        Args:
            max_blocks: Most (run_id, key) pairs held over all runs; a statistic for
                a new key beyond that is rejected.

        Raises:
            ValueError: If max_blocks < 1.
        """
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self._max_blocks = max_blocks
        self._lock = threading.Lock()
        self._blocks: dict[tuple[str, str], _BlockState] = {}
        self._pending: dict[tuple[str, str], _BlockState] = {}
        self._sequence = itertools.count()

    def submit(self, job: Job) -> Outcome:
        """Queues a statistic unless it is stale.

        Args:
            job: The statistic; its `sequence` and `state` are set here.

        Returns:
            What happened to it.

        Raises:
            StaleError: If its step is older than the newest step pending, being
                computed or published for its key.
            CapacityError: If its key is new and the scheduler is full.
        """
        ident = (job.run_id, job.key)
        with self._lock:
            state = self._blocks.get(ident)
            if state is None:
                if len(self._blocks) >= self._max_blocks:
                    raise CapacityError(
                        f"the service already holds max_blocks={self._max_blocks} blocks; drop "
                        "finished runs (DropRun) or start it with a larger --max_blocks"
                    )
                state = self._blocks[ident] = _BlockState()
            newest = state.newest_step()
            if newest is not None and job.step < newest:
                raise StaleError(
                    f"stale: step {job.step} is older than step {newest} already "
                    f"{self._describe(state, newest)} for this key"
                )
            if newest is not None and job.step == newest:
                return Outcome.DUPLICATE
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
        """Records that a job taken with `take` is done.

        Args:
            job: The job.
            published: Whether its root was published.

        Returns:
            False if the job's run was dropped while it was being computed, in which
            case its root must not be published.
        """
        with self._lock:
            state = self._blocks.get((job.run_id, job.key))
            if state is not job.state:
                return False
            if state.computing_step == job.step:
                state.computing_step = None
            if published:
                state.published_step = max(job.step, state.published_step or job.step)
            return True

    def drop_run(self, run_id: str) -> int:
        """Forgets a run: its pending statistics go, its computing jobs are orphaned.

        Args:
            run_id: The run.

        Returns:
            How many keys the run had.
        """
        with self._lock:
            idents = [ident for ident in self._blocks if ident[0] == run_id]
            for ident in idents:
                del self._blocks[ident]
                self._pending.pop(ident, None)
            return len(idents)

    def queue_depth(self, run_id: str | None = None) -> int:
        """Returns how many keys have a pending statistic (in one run, or in all)."""
        with self._lock:
            if run_id is None:
                return len(self._pending)
            return sum(1 for ident in self._pending if ident[0] == run_id)

    def blocks_known(self, run_id: str | None = None) -> int:
        """Returns how many keys are held (in one run, or in all)."""
        with self._lock:
            if run_id is None:
                return len(self._blocks)
            return sum(1 for ident in self._blocks if ident[0] == run_id)

    @staticmethod
    def _describe(state: _BlockState, step: int) -> str:
        if state.pending is not None and state.pending.step == step:
            return "pending"
        if state.computing_step == step:
            return "being computed"
        return "published"
