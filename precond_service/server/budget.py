"""The byte budget: what the service holds for clients, bounded by `--memory_budget_mb`.

Counted: the push messages being received and validated, the statistics pending or
being computed, and the published roots. A push stream that declares the size of its
largest message (`wire.MESSAGE_BYTES_METADATA`; `PreconditionerClient` always does)
is admitted before any of its bytes are read: room for one such message is held for
the stream's life (its messages are then received one at a time), or the stream
ends at once with RESOURCE_EXHAUSTED naming the flag.
Concurrent large pushes are so admitted against the budget instead of all being
received first. A stream without the declaration has each message counted once gRPC
has received it whole (the `--max_streams` cap bounds those). Statistics and roots are
charged as they are queued and published, and released as they are replaced,
computed, or dropped with their run, so what was admitted is never refused later.
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

    def charge(self, nbytes: int) -> None:
        """Counts bytes the service now holds whatever the budget (admitted earlier)."""
        with self._lock:
            self._held += nbytes

    def release(self, nbytes: int) -> None:
        """Stops counting bytes the service no longer holds."""
        with self._lock:
            self._held -= nbytes


class BudgetExceededError(Exception):
    """A request that does not fit in the byte budget (RESOURCE_EXHAUSTED)."""
