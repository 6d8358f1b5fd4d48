"""Connects a Shampoo optimizer in async mode to the preconditioner service.

The host calls `ServicePreconditioning.after_steps()` between inner training
loops (or lets `ShampooServiceCallback` do it in `model.fit`). It never waits on
the service: statistics go to the client's push thread, and whatever roots the
pull thread has received by then are installed. How old the installed roots are
is `staleness.staleness`; the thread that turns statistics into blocks is
`snapshot_pusher.SnapshotPusher`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import keras

from precond_service.client import PreconditionerClient
from precond_service.common.blocks import RootFailure
from precond_service.common.versions import is_newer
from trainer.optimizers.shampoo import Shampoo
from trainer.optimizers.snapshot_pusher import SnapshotPusher
from trainer.optimizers.staleness import Staleness, block_ages, staleness

__all__ = [
    "CADENCES",
    "ServicePreconditioning",
    "ShampooServiceCallback",
    "Staleness",
    "block_ages",
    "staleness",
]

log = logging.getLogger(__name__)


# When pushes happen: every `update_steps` updates ("fixed"), or as soon as the
# service has published the roots of the previous push, and at the latest after
# `update_steps` updates ("adaptive"), so that staleness follows its throughput.
CADENCES = ("fixed", "adaptive")


@dataclasses.dataclass(frozen=True)
class _AwaitedPush:
    """Statistics pushed at `step` whose roots are due at `due_step` (delay mode)."""

    step: int
    due_step: int
    keys: frozenset[str]


class ServicePreconditioning:
    """Pushes statistics every `update_steps` steps and installs newer roots.

    By default roots are installed as soon as they arrive, so which step first
    uses a root depends on timing, and the statistics are converted and pushed
    on a thread of their own (the training thread only reads them). With
    `cadence="adaptive"` a push follows as soon as the roots of the previous one
    are all published (at the latest after `update_steps` updates).

    With `delay_steps` = D > 0 the run is repeatable: statistics are pushed at
    every multiple t of `update_steps`, and their roots are installed at step
    t + D exactly, neither earlier nor later (the host waits for them there if
    they have not arrived).

    Args:
        optimizer: A built Shampoo optimizer with `precondition_mode="async"`
            (`optimizer.build(model.trainable_variables)`).
        client: A started `PreconditionerClient`.
        update_steps: Steps between statistics pushes (N); with the adaptive
            cadence, the longest interval.
        delay_steps: 0, or D with 1 <= D <= N for the repeatable mode.
        cadence: "fixed" or "adaptive" (see `CADENCES`); the repeatable mode is
            "fixed".
        delay_timeout_s: Longest wait for due roots in the repeatable mode.
        poll_s: Seconds between looks at the client while waiting.

    Raises:
        ValueError: The optimizer is not in async mode, or update_steps < 1, or
            delay_steps is outside [0, update_steps].
        RuntimeError: The optimizer is not built yet.
    """

    def __init__(
        self,
        optimizer: Shampoo,
        client: PreconditionerClient,
        update_steps: int,
        delay_steps: int = 0,
        delay_timeout_s: float = 600.0,
        poll_s: float = 0.01,
        cadence: str = "fixed",
    ):
        if optimizer.precondition_mode != "async":
            raise ValueError(
                "ServicePreconditioning needs Shampoo(precondition_mode='async'), "
                f"got precondition_mode={optimizer.precondition_mode!r}"
            )
        if not isinstance(update_steps, int) or update_steps < 1:
            raise ValueError(f"update_steps must be a positive integer, got {update_steps!r}")
        if not isinstance(delay_steps, int) or not 0 <= delay_steps <= update_steps:
            raise ValueError(
                f"delay_steps must be an integer in [0, update_steps={update_steps}], "
                f"got {delay_steps!r}"
            )
        if cadence not in CADENCES or (cadence == "adaptive" and delay_steps):
            raise ValueError(
                f"cadence must be one of {list(CADENCES)} ('fixed' with delay_steps), "
                f"got {cadence!r}"
            )
        self.optimizer = optimizer
        self.cadence = cadence
        self.client = client
        self.update_steps = update_steps
        self.delay_steps = delay_steps
        self.delay_timeout_s = delay_timeout_s
        self._poll_s = poll_s
        self._keys = frozenset(optimizer.preconditioner_stats_steps())
        # key -> stats_step already offered to the optimizer, so that a batch with
        # nothing new reads no optimizer variable. The optimizer still decides what
        # is newer than what it holds (after a checkpoint restore, for example).
        self._offered: dict[str, int] = {}
        self._last_push_step: int | None = None
        # The update count when the bridge was made (> 0: a resumed run).
        self._first_step = int(optimizer.iterations.numpy())
        self._awaited: _AwaitedPush | None = None
        # Seconds spent waiting for due roots (delay mode), in all.
        self.wait_seconds = 0.0
        # Delay mode: due roots the service reported it could not compute; those
        # blocks kept the root they held.
        self.failed_roots = 0
        # Pushes made, and the training thread's seconds spent reading statistics.
        self.pushes = 0
        self.read_seconds = 0.0
        self._pusher = None if delay_steps else SnapshotPusher(client)

    @property
    def step(self) -> int:
        """The one clock of the seam: the optimizer's count of applied updates.

        Statistics and roots are named by it, pushes are scheduled on it and
        staleness is measured against it. Steps skipped for non-finite gradients
        do not advance it.
        """
        return int(self.optimizer.iterations.numpy())

    def steps_until_due(self) -> int:
        """Updates until the next push or (delay mode) install is due; at least 1.

        The trainer ends its inner loops there, so that pushes happen at multiples
        of `update_steps` and delayed roots are installed at exactly t + D.
        """
        step = self.step
        due = self._next_push_step(step)
        if self._awaited is not None:
            due = min(due, self._awaited.due_step)
        return max(due - step, 1)

    def _next_push_step(self, step: int) -> int:
        """The update count at which the next push is due (now, if one is overdue)."""
        if self._last_push_step is None and not self.delay_steps and self._first_step > 0:
            return step  # a resumed run pushes at once: the service may hold nothing
        last = self._first_step if self._last_push_step is None else self._last_push_step
        if self.cadence == "adaptive":
            return step if step > last and self._last_push_published() else last + self.update_steps
        return (last // self.update_steps + 1) * self.update_steps

    def _last_push_published(self) -> bool:
        """Whether the client holds the roots of every block of the last push (if any)."""
        if self._last_push_step is None:
            return True
        pushed = self._pusher.last_pushed if self._pusher is not None else None
        if pushed is None or pushed[0] != self._last_push_step:
            return False  # still being converted
        step, keys = pushed
        latest = self.client.latest()
        return all(key in latest and not is_newer(step, latest[key].stats_step) for key in keys)

    def after_steps(self) -> int:
        """Host work between inner loops; returns how many roots were installed.

        Raises:
            TimeoutError: In delay mode, the due roots did not arrive within
                `delay_timeout_s`.
            PermanentServiceError: The service refused this client for good
                (UNAUTHENTICATED, PERMISSION_DENIED).
        """
        self.client.check()  # a refused token or run stops the run with what to fix
        step = self.step
        if self.delay_steps:
            return self._after_steps_delayed(step)
        if step > 0 and step >= self._next_push_step(step):
            began = time.perf_counter()
            self._pusher.submit(self.optimizer.read_statistics())
            self.read_seconds += time.perf_counter() - began
            self._last_push_step = step
            self.pushes += 1
        fresh = [
            block
            for key, block in self.client.latest().items()
            if key in self._keys and is_newer(block.stats_step, self._offered.get(key))
        ]
        if not fresh:
            return 0
        self._offered.update((block.key, block.stats_step) for block in fresh)
        return self.optimizer.assign_preconditioners(fresh)

    def _after_steps_delayed(self, step: int) -> int:
        installed = 0
        awaited = self._awaited
        if awaited is not None and step >= awaited.due_step:
            if step > awaited.due_step:
                log.warning(
                    "step %d: roots of step %d were due at step %d; installing them late",
                    step,
                    awaited.step,
                    awaited.due_step,
                )
            installed = self.optimizer.assign_preconditioners(self._wait_for(awaited))
            self._awaited = None
        if step > 0 and step % self.update_steps == 0 and self._last_push_step != step:
            snapshot = self.optimizer.statistics_snapshot()
            self._last_push_step = step
            self.pushes += 1
            if snapshot:
                self.client.push(snapshot)
                self._awaited = _AwaitedPush(
                    step=step,
                    due_step=step + self.delay_steps,
                    keys=frozenset(block.key for block in snapshot),
                )
        return installed

    def wait_pushed(self, timeout_s: float = 30.0) -> bool:
        """Waits until the statistics read so far were handed to the client (tests, exit)."""
        return self._pusher is None or self._pusher.wait_idle(timeout_s)

    def close(self) -> None:
        """Stops the push thread (the client is closed by its owner)."""
        if self._pusher is not None:
            self._pusher.close()

    def __enter__(self) -> ServicePreconditioning:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wait_for(self, awaited: _AwaitedPush) -> list:
        """Waits until the client holds, or the service failed, each root of `awaited`.

        Returns the roots that arrived. A root the service reports failed (the
        solver could not compute it from that statistic) is not waited for: its
        block keeps the root it holds, the same on every rerun, and it is counted in
        `failed_roots`.
        """
        began = time.monotonic()
        next_report = began + 10.0
        next_pull = began
        while True:
            latest = self.client.latest()
            arrived = [
                latest[key]
                for key in awaited.keys
                if key in latest and not is_newer(awaited.step, latest[key].stats_step)
            ]
            failed = {
                key: failure
                for key, failure in self.client.failures().items()
                if key in awaited.keys and failure.stats_step == awaited.step
            }
            now = time.monotonic()
            if len(arrived) + len(failed) >= len(awaited.keys):
                self.wait_seconds += now - began
                newer = [b.key for b in arrived if b.stats_step != awaited.step]
                if newer:  # Cannot happen while delay_steps <= update_steps.
                    raise RuntimeError(f"roots newer than step {awaited.step}: {newer[:3]}")
                if failed:
                    self._report_failures(awaited.step, failed)
                return arrived
            if now - began > self.delay_timeout_s:
                self.wait_seconds += now - began
                status = self.client.status()
                raise TimeoutError(
                    f"precond.delay_steps={self.delay_steps}: {len(arrived)} of "
                    f"{len(awaited.keys)} roots of step {awaited.step} arrived within "
                    f"precond.delay_timeout_s={self.delay_timeout_s:g} s (service "
                    f"{self.client.address}, connected={status.connected}, last error: "
                    f"{status.last_error}). The service may be down, or may have failed to "
                    "compute a root (see its log); resume from the last checkpoint once it "
                    "is back, or set precond.delay_steps=0"
                )
            if now >= next_pull:  # rather than wait for the client's pull interval
                self.client.pull_now()
                next_pull = now + 0.1
            if now >= next_report:
                log.warning(
                    "waiting %.0f s for roots of step %d (%d of %d arrived; service %s %s)",
                    now - began,
                    awaited.step,
                    len(arrived),
                    len(awaited.keys),
                    self.client.address,
                    "connected" if self.client.status().connected else "unreachable",
                )
                next_report = now + 10.0
            time.sleep(self._poll_s)

    def _report_failures(self, step: int, failed: dict[str, RootFailure]) -> None:
        self.failed_roots += len(failed)
        key, failure = next(iter(sorted(failed.items())))
        log.warning(
            "%d root(s) of step %d failed at the service (for example %s: %s); those blocks "
            "keep the root they hold (%d failed so far)",
            len(failed),
            step,
            key,
            failure.reason,
            self.failed_roots,
        )


class ShampooServiceCallback(keras.callbacks.Callback):
    """`model.fit` callback running `ServicePreconditioning.after_steps` after each batch.

    Args:
        bridge: The `ServicePreconditioning` to drive.
    """

    def __init__(self, bridge: ServicePreconditioning):
        super().__init__()
        self.bridge = bridge

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.bridge.after_steps()
