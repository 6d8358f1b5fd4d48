"""The client's push loop: sends pending statistics, newest-only, with retries.

`PushLoop` holds the statistics not yet sent and the figures of its pushes, and
runs on the client's push thread. How a push becomes messages is `encode`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

import grpc

from precond_service.client.core import ConnectionState, keep_newest
from precond_service.common import wire
from precond_service.common.blocks import StatisticsBlock
from precond_service.common.versions import is_newer

logger = logging.getLogger("precond_service.client.service_client")

# Errors that retrying the same request cannot fix: the blocks are dropped.
# RESOURCE_EXHAUSTED is not among them: the service's byte budget or stream caps
# refuse a push for now (a message too large for any retry is refused here, by
# `max_matrix_size`, before it is sent), so the push is retried with backoff.
_PERMANENT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})

# Rejections remembered for `ClientStatus.last_rejections`.
_REJECTIONS_KEPT = 10


class PushLoop:
    """Sends the statistics handed to `offer` on the push thread (`run`), newest-only.

    Args:
        state: The client's connection, shared with its pull loop.
        max_matrix_size: Largest matrix side sent; a larger block is rejected here.
    """

    def __init__(self, state: ConnectionState, max_matrix_size: int) -> None:
        self._state = state
        self.max_matrix_size = max_matrix_size
        self._wake = threading.Condition(state.lock)
        state.on_restart(self._resend_newest)
        state.on_stop(self._wake.notify_all)
        # Statistics not yet sent, and the newest sent (pushed again after a restart).
        self._pending: dict[str, StatisticsBlock] = {}
        self._last_sent: dict[str, StatisticsBlock] = {}
        # Figures for `ClientStatus`, guarded by the state's lock.
        self.pushes_sent = 0
        self.blocks_sent = 0
        self.blocks_replaced = 0
        self.push_failures = 0
        self.blocks_rejected = 0
        self.rejections: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=_REJECTIONS_KEPT
        )
        self.latency_s: float | None = None

    @property
    def pending_blocks(self) -> int:
        """Blocks waiting to be sent; the caller holds the state's lock."""
        return len(self._pending)

    def offer(self, blocks: Sequence[StatisticsBlock]) -> None:
        """Queues blocks, each replacing an older unsent one of its key; returns at once."""
        with self._state.lock:
            for block in blocks:
                held = self._pending.get(block.key)
                if held is not None:
                    if not is_newer(block.step, held.step):
                        continue
                    self.blocks_replaced += 1
                self._pending[block.key] = block
            self._wake.notify()

    def run(self, push_call: grpc.StreamUnaryMultiCallable) -> None:
        """The push thread: sends what is pending until the client stops."""
        state = self._state
        failures = 0
        while True:
            with state.lock:
                while not self._pending and not state.stopped():
                    self._wake.wait()
                if state.stopped():
                    return
                blocks, self._pending = list(self._pending.values()), {}
            if self._push_once(push_call, blocks):
                if failures:  # the service is back: the pull loop need not wait either
                    state.wake_puller.set()
                failures = 0
            else:
                failures += 1
                state.wake_retry.clear()
                state.wake_retry.wait(state.backoff(failures))

    def encode(
        self, blocks: list[StatisticsBlock], local_rejections: list[tuple[str, str]]
    ) -> list[list[bytes | memoryview]]:
        """The push's messages as unjoined pieces (`wire.push_request_pieces`).

        Each holds at most PUSH_BATCH_BYTES, a large block going in chunks. A block
        that cannot be sent is left out, with its reason in `local_rejections`.
        """
        sendable: list[StatisticsBlock] = []
        for block in blocks:
            try:
                array = wire.wire_array(block.statistics)
                if array.ndim and array.shape[0] > self.max_matrix_size:
                    raise ValueError(
                        f"matrix side {array.shape[0]} exceeds the client's max_matrix_size "
                        f"{self.max_matrix_size}"
                    )
            except (ValueError, TypeError) as e:
                local_rejections.append((block.key, f"not sent: {e}"))
                continue
            sendable.append(dataclasses.replace(block, statistics=array))
        return wire.push_messages(self._state.run_id, sendable)

    def _push_once(
        self, push_call: grpc.StreamUnaryMultiCallable, blocks: list[StatisticsBlock]
    ) -> bool:
        """Sends blocks in one streaming RPC; returns whether the service answered it.

        False: the push failed and is retried after a backoff (transient), or the
        client stopped for good (see `ConnectionState.fail_if_permanent`).
        """
        state = self._state
        local_rejections: list[tuple[str, str]] = []
        start = time.perf_counter()
        messages = self.encode(blocks, local_rejections)
        # The service admits the stream against its byte budget from this declaration.
        largest = max(map(wire.pieces_size, messages), default=0)
        future = push_call.future(
            (b"".join(pieces) for pieces in messages),
            timeout=state.rpc_timeout_s,
            metadata=(*state.metadata, (wire.MESSAGE_BYTES_METADATA, str(largest))),
        )
        state.track(future)
        try:
            reply = future.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            return self._push_failed(e, blocks, local_rejections)
        finally:
            state.untrack(future)
        latency = time.perf_counter() - start
        rejections = local_rejections + [(r.key, r.reason) for r in reply.rejected]
        with state.lock:
            state.connected = True
            self.pushes_sent += 1
            self.blocks_sent += len(blocks) - len(local_rejections)
            self.latency_s = latency
            self._count_rejections(rejections)
            keep_newest(self._last_sent, blocks)
        state.saw_incarnation(reply.incarnation)
        return True

    def _push_failed(
        self,
        error: Exception,
        blocks: list[StatisticsBlock],
        local_rejections: list[tuple[str, str]],
    ) -> bool:
        """Records a failed push; returns whether the service answered it (see `_push_once`)."""
        state = self._state
        code = error.code() if isinstance(error, grpc.RpcError) else grpc.StatusCode.CANCELLED
        details = error.details() if isinstance(error, grpc.RpcError) else "cancelled"
        permanent = code in _PERMANENT_CODES
        with state.lock:
            # Warn when the service is first found unreachable, not at every retry.
            loud = state.connected or self.push_failures == 0 or permanent
            self.push_failures += 1
            state.rpc_failed("PushStatistics", code, details)
            if permanent:
                reason = f"push failed with {code.name}: {details}"
                rejected_here = {key for key, _ in local_rejections}
                self._count_rejections(
                    local_rejections
                    + [(b.key, reason) for b in blocks if b.key not in rejected_here]
                )
            elif not state.closing.is_set():
                keep_newest(self._pending, blocks)
        if state.fail_if_permanent("PushStatistics", code, details):
            return False
        if not state.closing.is_set():
            logger.log(
                logging.WARNING if loud else logging.DEBUG,
                "push of %d blocks to %s failed (%s: %s); %s",
                len(blocks),
                state.address,
                code.name,
                details,
                "dropping them" if permanent else "will retry",
            )
        return permanent

    def _resend_newest(self) -> None:
        """After a service restart, queues the newest statistic sent of each key; holds the lock."""
        keep_newest(self._pending, self._last_sent.values())
        self._wake.notify()
        logger.warning("pushing %d statistics again", len(self._last_sent))

    def _count_rejections(self, rejections: list[tuple[str, str]]) -> None:
        """Records rejections; the caller holds the lock."""
        self.blocks_rejected += len(rejections)
        self.rejections.extend(rejections)
        for key, reason in rejections[:3]:
            logger.warning("block %r rejected: %s", key, reason)
