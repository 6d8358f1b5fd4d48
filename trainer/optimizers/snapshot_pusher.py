"""The async bridge's own thread: turns read statistics into blocks and hands them to the client."""

from __future__ import annotations

import logging
import threading

from precond_service.client import PreconditionerClient
from trainer.optimizers.shampoo_state import StatisticsSnapshot

log = logging.getLogger("trainer.optimizers.service_bridge")


class SnapshotPusher:
    """Converts read statistics to blocks and hands them to the client, on its own thread.

    The training thread only reads the statistics (`Shampoo.read_statistics`); the
    copy out of the variables' buffers, the per-block loop and the push happen here.
    Newest only: a snapshot not yet taken up is replaced by a newer one.
    """

    def __init__(self, client: PreconditionerClient) -> None:
        self._client = client
        self._cond = threading.Condition()
        self._pending: StatisticsSnapshot | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        # (step, keys) of the last snapshot handed to the client.
        self.last_pushed: tuple[int, frozenset[str]] | None = None
        self._thread = threading.Thread(target=self._run, name="precond-snapshot", daemon=True)
        self._thread.start()

    def submit(self, snapshot: StatisticsSnapshot) -> None:
        """Queues `snapshot` for pushing; returns at once. Raises an earlier failure."""
        with self._cond:
            if self._error is not None:
                raise RuntimeError("pushing statistics failed") from self._error
            self._pending = snapshot
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Waits until every submitted snapshot was handed to the client."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._busy, timeout=timeout_s
            )

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                snapshot, self._pending, self._busy = self._pending, None, True
            try:
                blocks = snapshot.blocks()
                self._client.push(blocks)
                pushed = (snapshot.step, frozenset(block.key for block in blocks))
            except BaseException as e:  # noqa: BLE001 - reported on the training thread
                log.exception("could not push the statistics of step %d", snapshot.step)
                pushed, error = None, e
            else:
                error = None
            with self._cond:
                self._busy = False
                self._error = self._error or error
                self.last_pushed = pushed or self.last_pushed
                self._cond.notify_all()
