"""What one client may hold of the server: streams per peer and in all, and for how long.

The server answers every RPC on one asyncio event loop (`server.py`), so an idle
stream costs no thread; these limits bound what idle, slow or stopped clients can
hold and for how long:

- a streaming RPC (PushStatistics, GetPreconditioners) beyond
  `max_streams_per_peer` from one peer (one connection), or beyond `max_streams` in
  all, fails at once with RESOURCE_EXHAUSTED naming the flag; unary RPCs (health,
  GetStatus, DropRun) are never counted, so they always have room;
- a stream that delivers no message (a push) or takes no message (a pull) for
  `stream_idle_timeout_s`, or lasts longer than `stream_timeout_s`, fails with
  DEADLINE_EXCEEDED naming the flag.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

import grpc

T = TypeVar("T")


class StreamRefusedError(Exception):
    """A stream that must end: the status code and message to end it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamLimits:
    """Counts open streams per peer and in all; admits or refuses new ones.

    Used from the event loop thread only, so it needs no lock.
    """

    def __init__(
        self,
        *,
        max_streams: int,
        max_streams_per_peer: int,
        idle_timeout_s: float,
        timeout_s: float,
    ) -> None:
        """Sets the limits.

        Args:
            max_streams: Most streaming RPCs open at once over all peers.
            max_streams_per_peer: Most streaming RPCs open at once from one peer.
            idle_timeout_s: Longest wait for a stream's next message to arrive or
                to be taken.
            timeout_s: Longest life of a stream.
        """
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.idle_timeout_s = idle_timeout_s
        self.timeout_s = timeout_s
        self._open: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.timed_out = 0

    @property
    def open_streams(self) -> int:
        """Streaming RPCs open now."""
        return sum(self._open.values())

    @contextlib.contextmanager
    def admit(self, peer: str) -> Iterator[StreamDeadline]:
        """Holds a stream slot for `peer` while the block runs.

        Raises:
            StreamRefusedError: RESOURCE_EXHAUSTED, the peer or the server is at its cap.
        """
        if self._open[peer] >= self.max_streams_per_peer:
            self.refused += 1
            raise StreamRefusedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this connection already has {self._open[peer]} streams open, the most "
                f"--max_streams_per_peer={self.max_streams_per_peer} allows; finish or cancel "
                "one first",
            )
        if self.open_streams >= self.max_streams:
            self.refused += 1
            raise StreamRefusedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the service has {self.open_streams} streams open, the most "
                f"--max_streams={self.max_streams} allows; retry later",
            )
        self._open[peer] += 1
        try:
            yield StreamDeadline(self)
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]


class StreamDeadline:
    """The idle and total deadlines of one admitted stream."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self._end = time.monotonic() + limits.timeout_s

    async def within(self, step: Awaitable[T], doing: str) -> T:
        """Awaits one step of the stream (a read or a write) within both deadlines.

        Args:
            step: The read or write.
            doing: What the step is, for the error ("sending the next message").

        Returns:
            What the step returns.

        Raises:
            StreamRefusedError: DEADLINE_EXCEEDED, naming the flag that ran out.
        """
        left = self._end - time.monotonic()
        idle = self._limits.idle_timeout_s
        try:
            return await asyncio.wait_for(step, max(min(idle, left), 0.0))
        except TimeoutError:
            self._limits.timed_out += 1
            if idle <= left:
                flag = f"--stream_idle_timeout_s={idle:g}"
                why = f"the client spent more than {idle:g} s {doing}"
            else:
                flag = f"--stream_timeout_s={self._limits.timeout_s:g}"
                why = f"the stream lasted more than {self._limits.timeout_s:g} s"
            raise StreamRefusedError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{why} ({flag}); the stream is closed"
            ) from None

    async def messages(self, requests: AsyncIterator[T], *, prefetch: bool) -> AsyncIterator[T]:
        """Yields a request stream's messages, each within the deadlines.

        Args:
            requests: The stream.
            prefetch: Whether the next message is received while the caller works
                on the previous one (faster; two messages held at once).
        """
        iterator = aiter(requests)
        pending = asyncio.ensure_future(anext(iterator, None))
        try:
            while True:
                item = await self.within(asyncio.shield(pending), "sending the next message")
                if item is None:
                    return
                if prefetch:
                    pending = asyncio.ensure_future(anext(iterator, None))
                    yield item
                else:
                    yield item
                    pending = asyncio.ensure_future(anext(iterator, None))
        finally:
            pending.cancel()
