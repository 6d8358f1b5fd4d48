"""State and rules the client's push and pull threads share (see `client.py`).

`ClientCore` holds the connection state both threads update (connected, the
service's incarnation, the last error, whether the service refused the client for
good), the RPCs in flight that `close` cancels, and the one merge rule of the
client's caches, `keep_newest`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable
from typing import TypeVar

import grpc

from precond_service.common.auth import TOKEN_ENV
from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from precond_service.common.versions import is_newer

logger = logging.getLogger("precond_service.client.service_client")

B = TypeVar("B", StatisticsBlock, PreconditionerBlock)

# Errors that no request of this client can get past, and what to do about each:
# the push and pull threads stop, and `check` raises PermanentServiceError.
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


class PermanentServiceError(RuntimeError):
    """The service refuses this client for good (UNAUTHENTICATED or PERMISSION_DENIED).

    Attributes:
        code: The gRPC status the service answered.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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


class ClientCore:
    """What the push and pull threads share; guarded by `_lock`."""

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
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._rpc_timeout_s = rpc_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._lock = threading.Lock()
        self._wake_pusher = threading.Condition(self._lock)
        self._closing = threading.Event()
        # Cut the pull thread's wait short (`pull_now`, or the push thread got
        # through after failures), and the push thread's backoff (a pull got through).
        self._wake_puller = threading.Event()
        self._wake_retry = threading.Event()
        # Statistics not yet sent, and the newest sent (pushed again after a restart).
        self._pending: dict[str, StatisticsBlock] = {}
        self._last_sent: dict[str, StatisticsBlock] = {}
        self._calls: set[grpc.Future | grpc.Call] = set()
        self._connected = False
        self._incarnation: str | None = None
        self._restarts_seen = 0
        self._last_error: str | None = None
        self._permanent_error: PermanentServiceError | None = None

    def _stopped(self) -> bool:
        """Whether the threads should end: closing, or refused for good."""
        return self._closing.is_set() or self._permanent_error is not None

    def _fail_if_permanent(self, rpc: str, code: grpc.StatusCode, details: str | None) -> bool:
        """Stops both threads for good if `code` is one no retry gets past.

        Returns:
            Whether it did.
        """
        error = permanent_error(rpc, self.address, code, details)
        if error is None:
            return False
        with self._lock:
            if self._permanent_error is not None:
                return True
            self._permanent_error = error
            self._wake_pusher.notify_all()
        self._wake_puller.set()
        self._wake_retry.set()
        logger.error("%s; the client stops pushing and pulling", error)
        return True

    def _track(self, call: grpc.Future | grpc.Call) -> None:
        """Remembers an RPC in flight so that `close` can cancel it."""
        with self._lock:
            self._calls.add(call)
            closing = self._closing.is_set()
        if closing:  # `close` ran before the call was remembered.
            call.cancel()

    def _saw_incarnation(self, incarnation: str) -> None:
        """Re-pushes the newest statistics when the service has restarted."""
        with self._lock:
            if self._incarnation == incarnation:
                return
            if self._incarnation is not None:
                self._restarts_seen += 1
                keep_newest(self._pending, self._last_sent.values())
                self._wake_pusher.notify()
                logger.warning(
                    "service at %s restarted (incarnation %s -> %s); pushing %d statistics again",
                    self.address,
                    self._incarnation,
                    incarnation,
                    len(self._last_sent),
                )
            self._incarnation = incarnation

    def _backoff(self, failures: int) -> float:
        delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (failures - 1))
        return delay * random.uniform(0.5, 1.0)


def _version(block: StatisticsBlock | PreconditionerBlock) -> int:
    """The version of a statistic (its step) or of a root (its statistic's step)."""
    return block.step if isinstance(block, StatisticsBlock) else block.stats_step


def keep_newest(held: dict[str, B], offered: Iterable[B]) -> None:
    """Puts each offered block in `held` (by key) where it is newer than what is there."""
    for block in offered:
        there = held.get(block.key)
        if there is None or is_newer(_version(block), _version(there)):
            held[block.key] = block
