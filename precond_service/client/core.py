"""The connection state a client's push and pull loops share (see `service_client.py`).

`ConnectionState` holds what both loops update: connected, the service's
incarnation, the last error, whether the service refused the client for good,
the RPCs in flight that `close` cancels, and the events by which one loop wakes
the other. `ClientStatus` is what a client reports of itself; `keep_newest` is
the one merge rule of the client's caches.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc

from precond_service.common.auth import TOKEN_ENV
from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from precond_service.common.versions import is_newer

logger = logging.getLogger("precond_service.client.service_client")

B = TypeVar("B", StatisticsBlock, PreconditionerBlock)

# Errors that no request of this client can get past, and what to do about each:
# the push and pull loops stop, and `check` raises PermanentServiceError.
_FATAL_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: (
        f"the service wants a token this client does not send or gets wrong: give the "
        f"trainer the service's token (config precond.token_file, or ${TOKEN_ENV})"
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        "the service refuses this client: check its TLS client certificate and the run_id, "
        "and the service's access settings"
    ),
}


def permanent_error(
    rpc: str, address: str, code: grpc.StatusCode, details: str | None
) -> PermanentServiceError | None:
    """The error of an RPC answered with a status no retry gets past; None for any other."""
    advice = _FATAL_CODES.get(code)
    if advice is None:
        return None
    return PermanentServiceError(
        code, f"{rpc} to {address} failed with {code.name} ({details}); {advice}"
    )


# Codes after which the service counts as unreachable.
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclasses.dataclass(frozen=True)
class ClientStatus:
    """What the client has done so far.

    Attributes:
        connected: Whether the last RPC reached the service.
        incarnation: The service's incarnation last seen (None before any reply).
        restarts_seen: Times the incarnation changed (service restarts noticed).
        pushes_sent: PushStatistics RPCs that completed.
        blocks_sent: Blocks in those RPCs.
        blocks_replaced: Blocks replaced by a newer one before they were sent.
        pending_blocks: Blocks waiting to be sent now.
        push_failures: PushStatistics RPCs that failed.
        blocks_rejected: Blocks the service (or the client itself) rejected.
        last_rejections: (key, reason) of the latest rejections, oldest first.
        pulls: GetPreconditioners RPCs that completed.
        pull_failures: GetPreconditioners RPCs that failed.
        preconditioners_received: Roots received.
        last_push_latency_s: Duration of the last completed push RPC.
        last_pull_latency_s: Duration of the last completed pull RPC.
        last_error: The last RPC error, as text.
        permanent_error: Why the client stopped for good (the service refused it,
            see `PreconditionerClient.check`); None while it runs.
        root_failures_seen: Roots the service reported it could not compute, each
            (key, step) counted once (see `PreconditionerClient.failures`).
    """

    connected: bool
    incarnation: str | None
    restarts_seen: int
    pushes_sent: int
    blocks_sent: int
    blocks_replaced: int
    pending_blocks: int
    push_failures: int
    blocks_rejected: int
    last_rejections: tuple[tuple[str, str], ...]
    pulls: int
    pull_failures: int
    preconditioners_received: int
    last_push_latency_s: float | None
    last_pull_latency_s: float | None
    last_error: str | None
    permanent_error: str | None = None
    root_failures_seen: int = 0


class PermanentServiceError(RuntimeError):
    """The service refuses this client for good (UNAUTHENTICATED or PERMISSION_DENIED).

    Attributes:
        code: The gRPC status the service answered.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionState:
    """One client's connection to one service, shared by its push and pull loops.

    Every attribute that changes is guarded by `lock`.

    Attributes:
        address: "host:port" of the service.
        run_id: The run's name at the service.
        metadata: gRPC metadata of every RPC (the token, if any).
        rpc_timeout_s: Deadline of one push or pull RPC.
        lock: Guards this object and the loops' figures.
        closing: Set by `close`.
        wake_puller: Cuts the pull loop's wait short (`pull_now`, or a push got
            through after failures).
        wake_retry: Cuts the push loop's backoff short (a pull got through).
    """

    def __init__(
        self,
        address: str,
        run_id: str,
        *,
        token: str | None,
        rpc_timeout_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        self.address = address
        self.run_id = run_id
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.wake_puller = threading.Event()
        self.wake_retry = threading.Event()
        self.connected = False
        self.incarnation: str | None = None
        self.restarts_seen = 0
        self.last_error: str | None = None
        self.permanent_error: PermanentServiceError | None = None
        self._calls: set[grpc.Future | grpc.Call] = set()
        # Called, with the lock held, when the service restarted (forgot everything).
        self._restart_listeners: list[Callable[[], None]] = []
        # Called, with the lock held, when the loops must stop (close, refused).
        self._stop_listeners: list[Callable[[], None]] = []

    def on_restart(self, listener: Callable[[], None]) -> None:
        """Calls `listener` (with the lock held) whenever the service's incarnation changes."""
        self._restart_listeners.append(listener)

    def on_stop(self, listener: Callable[[], None]) -> None:
        """Calls `listener` (with the lock held) when the loops must stop."""
        self._stop_listeners.append(listener)

    def stopped(self) -> bool:
        """Whether the loops should end: closing, or refused for good."""
        return self.closing.is_set() or self.permanent_error is not None

    def rpc_failed(self, rpc: str, code: grpc.StatusCode, details: str | None) -> None:
        """Records a failed RPC's error; the caller holds the lock."""
        self.last_error = f"{rpc}: {code.name}: {details}"
        if code in _UNREACHABLE_CODES:
            self.connected = False

    def fail_if_permanent(self, rpc: str, code: grpc.StatusCode, details: str | None) -> bool:
        """Stops both loops for good if `code` is one no retry gets past.

        Returns:
            Whether it did.
        """
        error = permanent_error(rpc, self.address, code, details)
        if error is None:
            return False
        with self.lock:
            if self.permanent_error is not None:
                return True
            self.permanent_error = error
            self._notify_stop()
        logger.error("%s; the client stops pushing and pulling", error)
        return True

    def close(self) -> None:
        """Stops both loops and cancels the RPCs in flight; returns at once."""
        with self.lock:
            self.closing.set()
            self._notify_stop()
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def track(self, call: grpc.Future | grpc.Call) -> None:
        """Remembers an RPC in flight so that `close` can cancel it."""
        with self.lock:
            self._calls.add(call)
            closing = self.closing.is_set()
        if closing:  # `close` ran before the call was remembered.
            call.cancel()

    def untrack(self, call: grpc.Future | grpc.Call) -> None:
        """Forgets an RPC that ended."""
        with self.lock:
            self._calls.discard(call)

    def saw_incarnation(self, incarnation: str) -> None:
        """Notes the service's incarnation; a change means it restarted and forgot everything."""
        with self.lock:
            if self.incarnation == incarnation:
                return
            if self.incarnation is not None:
                self.restarts_seen += 1
                logger.warning(
                    "service at %s restarted (incarnation %s -> %s)",
                    self.address,
                    self.incarnation,
                    incarnation,
                )
                for listener in self._restart_listeners:
                    listener()
            self.incarnation = incarnation

    def backoff(self, failures: int) -> float:
        """Seconds to wait after `failures` failures in a row: doubling, capped, jittered."""
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))
        return delay * random.uniform(0.5, 1.0)

    def _notify_stop(self) -> None:
        for listener in self._stop_listeners:
            listener()
        self.wake_puller.set()
        self.wake_retry.set()


def _version(block: StatisticsBlock | PreconditionerBlock) -> int:
    """The version of a statistic (its step) or of a root (its statistic's step)."""
    return block.step if isinstance(block, StatisticsBlock) else block.stats_step


def keep_newest(held: dict[str, B], offered: Iterable[B]) -> None:
    """Puts each offered block in `held` (by key) where it is newer than what is there."""
    for block in offered:
        there = held.get(block.key)
        if there is None or is_newer(_version(block), _version(there)):
            held[block.key] = block
