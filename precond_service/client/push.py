"""The client's push thread: sends pending statistics, newest-only, with retries."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import grpc

from precond_service.client.core import ClientCore, keep_newest
from precond_service.common import wire
from precond_service.common.blocks import StatisticsBlock

logger = logging.getLogger("precond_service.client.service_client")

# Errors that retrying the same request cannot fix: the blocks are dropped.
# RESOURCE_EXHAUSTED is not among them: the service's byte budget or stream caps
# refuse a push for now (a message too large for any retry is refused here, by
# `max_matrix_size`, before it is sent), so the push is retried with backoff.
_PERMANENT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})

# Rejections remembered for `ClientStatus.last_rejections`.
_REJECTIONS_KEPT = 10


class PushThread(ClientCore):
    """The push thread of a `PreconditionerClient`, and the figures it keeps."""

    def _init_push(self, max_matrix_size: int) -> None:
        """Sets up the push thread's state; the client's constructor calls it."""
        self._max_matrix_size = max_matrix_size
        self._pushes_sent = 0
        self._blocks_sent = 0
        self._blocks_replaced = 0
        self._push_failures = 0
        self._blocks_rejected = 0
        self._rejections: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=_REJECTIONS_KEPT
        )
        self._push_latency: float | None = None

    def _push_loop(self, push_call: grpc.StreamUnaryMultiCallable) -> None:
        failures = 0
        while True:
            with self._lock:
                while not self._pending and not self._stopped():
                    self._wake_pusher.wait()
                if self._stopped():
                    return
                blocks, self._pending = list(self._pending.values()), {}
            if self._push_once(push_call, blocks):
                if failures:  # the service is back: the pull thread need not wait either
                    self._wake_puller.set()
                failures = 0
            else:
                failures += 1
                self._wake_retry.clear()
                self._wake_retry.wait(self._backoff(failures))

    def _push_once(
        self, push_call: grpc.StreamUnaryMultiCallable, blocks: list[StatisticsBlock]
    ) -> bool:
        """Sends blocks in one streaming RPC; returns whether the service answered it.

        False: the push failed and is retried after a backoff (transient), or the
        client stopped for good (see `_fail_if_permanent`).
        """
        local_rejections: list[tuple[str, str]] = []
        start = time.perf_counter()
        messages = self._messages(blocks, local_rejections)
        # The service admits the stream against its byte budget from this declaration.
        largest = max(map(wire.pieces_size, messages), default=0)
        future = push_call.future(
            (b"".join(pieces) for pieces in messages),
            timeout=self._rpc_timeout_s,
            metadata=(*self._metadata, (wire.MESSAGE_BYTES_METADATA, str(largest))),
        )
        self._track(future)
        try:
            reply = future.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            return self._push_failed(e, blocks, local_rejections)
        finally:
            with self._lock:
                self._calls.discard(future)
        latency = time.perf_counter() - start
        rejections = local_rejections + [(r.key, r.reason) for r in reply.rejected]
        with self._lock:
            self._connected = True
            self._pushes_sent += 1
            self._blocks_sent += len(blocks) - len(local_rejections)
            self._push_latency = latency
            self._count_rejections(rejections)
            keep_newest(self._last_sent, blocks)
        self._saw_incarnation(reply.incarnation)
        return True

    def _push_failed(
        self,
        error: Exception,
        blocks: list[StatisticsBlock],
        local_rejections: list[tuple[str, str]],
    ) -> bool:
        """Records a failed push; returns whether the service answered it (see `_push_once`)."""
        code = error.code() if isinstance(error, grpc.RpcError) else grpc.StatusCode.CANCELLED
        details = error.details() if isinstance(error, grpc.RpcError) else "cancelled"
        permanent = code in _PERMANENT_CODES
        with self._lock:
            # Warn when the service is first found unreachable, not at every retry.
            loud = self._connected or self._push_failures == 0 or permanent
            self._push_failures += 1
            self._last_error = f"PushStatistics: {code.name}: {details}"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._connected = False
            if permanent:
                reason = f"push failed with {code.name}: {details}"
                rejected_here = {key for key, _ in local_rejections}
                self._count_rejections(
                    local_rejections
                    + [(b.key, reason) for b in blocks if b.key not in rejected_here]
                )
            elif not self._closing.is_set():
                keep_newest(self._pending, blocks)
        if self._fail_if_permanent("PushStatistics", code, details):
            return False
        if not self._closing.is_set():
            logger.log(
                logging.WARNING if loud else logging.DEBUG,
                "push of %d blocks to %s failed (%s: %s); %s",
                len(blocks),
                self.address,
                code.name,
                details,
                "dropping them" if permanent else "will retry",
            )
        return permanent

    def _messages(
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
                if array.ndim and array.shape[0] > self._max_matrix_size:
                    raise ValueError(
                        f"matrix side {array.shape[0]} exceeds the client's max_matrix_size "
                        f"{self._max_matrix_size}"
                    )
            except (ValueError, TypeError) as e:
                local_rejections.append((block.key, f"not sent: {e}"))
                continue
            sendable.append(dataclasses.replace(block, statistics=array))
        return wire.push_messages(self.run_id, sendable)

    def _count_rejections(self, rejections: list[tuple[str, str]]) -> None:
        """Records rejections; the caller holds the lock."""
        self._blocks_rejected += len(rejections)
        self._rejections.extend(rejections)
        for key, reason in rejections[:3]:
            logger.warning("block %r rejected: %s", key, reason)
