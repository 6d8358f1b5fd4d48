"""The byte budget: what the service holds for clients, bounded by `--memory_budget_mb`.

Counted, each before it is held: every push message before it is parsed (twice its
size; gRPC receives at most `wire.MAX_REQUEST_BYTES` of it first), or, for a push that
declares its largest message (`wire.MESSAGE_BYTES_METADATA`), room for one such message
for the stream's life; a statistic sent in chunks, whole, at its first chunk
(`chunks.py`); and each statistic queued with its key's float64 root, at push time
(`Scheduler.submit`). What does not fit is refused with RESOURCE_EXHAUSTED naming the
flag. Statistics are released as they are replaced or computed, roots when their run
is dropped. Beyond the budget the service holds a fixed overhead (see docs/SERVICE.md,
section "Memory"): gRPC's one message per open stream, the interpreters, the workers'
solver arrays.
"""

from __future__ import annotations

import threading

_MIB = 1 << 20


class ByteBudget:
    """Thread-safe count of bytes held against a capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        """Creates an empty budget.

        Args:
            capacity_bytes: Most bytes `reserve` admits in all.
        """
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._held = 0
        self.refused = 0

    @property
    def held_bytes(self) -> int:
        """Bytes held now."""
        return self._held

    def reserve(self, nbytes: int, what: str) -> None:
        """Admits `nbytes` if they fit; the caller releases them later.

        Args:
            nbytes: Bytes wanted.
            what: What they are, for the error ("this push message").

        Raises:
            BudgetExceededError: If they do not fit; nothing is reserved.
        """
        with self._lock:
            if self._held + nbytes <= self.capacity_bytes:
                self._held += nbytes
                return
            self.refused += 1
            held = self._held
        raise BudgetExceededError(
            f"{what} needs {nbytes / _MIB:.1f} MiB, and the service already holds "
            f"{held / _MIB:.1f} MiB of its --memory_budget_mb={self.capacity_bytes // _MIB}; "
            "retry later, drop finished runs, or start the service with a larger "
            "--memory_budget_mb"
        )

    def release(self, nbytes: int) -> None:
        """Stops counting bytes the service no longer holds."""
        with self._lock:
            self._held -= nbytes


class BudgetExceededError(Exception):
    """A request that does not fit in the byte budget (RESOURCE_EXHAUSTED)."""
