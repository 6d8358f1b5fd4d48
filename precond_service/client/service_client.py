"""The client library the trainer uses to talk to the preconditioner service.

Nothing here ever blocks the training loop: `push` hands statistics to a background
push thread and returns, `latest` returns the roots that a background pull thread
has received so far, and both work the same whether the service is up, slow, down or
restarting. With a `TlsConfig` every channel it opens is TLS. Usage:

    client = PreconditionerClient(address="127.0.0.1:50051", run_id="run-1")
    client.start()
    client.push(blocks)          # every N steps: list of StatisticsBlock
    roots = client.latest()      # between inner loops: key -> PreconditionerBlock
    client.close()

Newest-only: a statistic not yet sent is replaced by a newer one of the same key, so
a slow service never builds a queue in the trainer. The client keeps references to
the pushed arrays (it does not copy them): do not modify them afterwards.

When an RPC fails with a transient error the client backs off exponentially and
retries (a push puts its unsent blocks back unless newer ones arrived meanwhile).
When the service's incarnation changes (it restarted and forgot everything), the
client pushes the newest statistic of every key again. When the service refuses the
client for good (UNAUTHENTICATED, PERMISSION_DENIED) both threads stop and `check`
raises `PermanentServiceError`.

Built by composition: what both threads share is one `core.ConnectionState`; the
push thread runs `push.PushLoop` and the pull thread `pull.PullLoop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from precond_service.client.core import (
    ClientStatus,
    ConnectionState,
    PermanentServiceError,
    keep_newest,
)
from precond_service.client.pull import PullLoop
from precond_service.client.push import PushLoop
from precond_service.common import wire
from precond_service.common.auth import TlsConfig, open_channel
from precond_service.common.blocks import PreconditionerBlock, RootFailure, StatisticsBlock
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

__all__ = [
    "ClientStatus",
    "PermanentServiceError",
    "PreconditionerClient",
    "keep_newest",
    "wait_for_serving",
]


def wait_for_serving(address: str, timeout_s: float, tls: TlsConfig | None = None) -> bool:
    """Waits until a service reports SERVING on the standard health service.

    Args:
        address: "host:port" of the service.
        timeout_s: Longest wait.
        tls: TLS settings for a TLS service; None for plaintext.

    Returns:
        Whether it reported SERVING within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    request = health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME)
    with open_channel(address, _channel_options(max_matrix_size=1), tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                reply = stub.Check(request, timeout=min(remaining, 1.0), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _channel_options(max_matrix_size: int, backoff_max_s: float = 5.0) -> list[tuple[str, int]]:
    limit = wire.max_message_bytes(max_matrix_size)
    return [
        # Statistics go out and roots come back one per message (no chunking).
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Reconnect soon after a restarted service is back (gRPC's default waits
        # up to two minutes between connection attempts).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(backoff_max_s * 1000)),
        # Notice a vanished remote host within about a minute and a half.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


class PreconditionerClient:
    """Pushes statistics to, and pulls roots from, a service in the background.

    Composed of one `ConnectionState` and the `PushLoop` and `PullLoop` that use it,
    each on a thread of its own.
    """

    def __init__(
        self,
        address: str,
        run_id: str,
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        pull_interval_s: float = 1.0,
        rpc_timeout_s: float = 300.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_matrix_size: int = 4096,
    ) -> None:
        """Creates a client; `start` starts its threads.

        Args:
            address: "host:port" of the service.
            run_id: Names this training run; keys of different runs never mix.
            token: Shared secret if the service was started with one.
            tls: TLS settings if the service serves TLS; None for plaintext.
            pull_interval_s: Seconds between pulls of new roots.
            rpc_timeout_s: Deadline of one push or pull RPC.
            backoff_initial_s: First wait after a failed RPC; doubles per failure.
            backoff_max_s: Longest wait between retries.
            max_matrix_size: Largest matrix side sent; a larger block is rejected
                here without being sent. Sets the message size limits.

        Raises:
            ValueError: If an argument is out of range.
        """
        _check_arguments(
            address,
            run_id,
            pull_interval_s=pull_interval_s,
            rpc_timeout_s=rpc_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            max_matrix_size=max_matrix_size,
        )
        self._state = ConnectionState(
            address,
            run_id,
            token=token,
            rpc_timeout_s=rpc_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        self._pusher = PushLoop(self._state, max_matrix_size)
        self._puller = PullLoop(self._state, pull_interval_s)
        self._tls = tls
        self._channel: grpc.Channel | None = None
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        """ "host:port" of the service."""
        return self._state.address

    @property
    def run_id(self) -> str:
        """The run's name at the service."""
        return self._state.run_id

    # The trainer's side: none of these block on the network.

    def start(self) -> None:
        """Starts the push and pull threads; does not wait for the service.

        Raises:
            RuntimeError: If the client was closed.
        """
        with self._state.lock:
            if self._state.closing.is_set():
                raise RuntimeError("start() after close(): create a new PreconditionerClient")
            if self._channel is not None:
                return
            self._channel = open_channel(
                self.address,
                _channel_options(self._pusher.max_matrix_size, self._state.backoff_max_s),
                self._tls,
            )
        stub = pb_grpc.PreconditionerServiceStub(self._channel)
        # Pushes send bytes serialized by `wire.encode_push_request` (one copy of each
        # matrix) rather than messages that gRPC would serialize.
        push_call = self._channel.stream_unary(
            f"/{wire.SERVICE_NAME}/PushStatistics",
            request_serializer=None,
            response_deserializer=pb.PushStatisticsReply.FromString,
        )
        self._threads = [
            threading.Thread(
                target=self._pusher.run, args=(push_call,), name="precond-push", daemon=True
            ),
            threading.Thread(
                target=self._puller.run, args=(stub,), name="precond-pull", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    def push(self, blocks: Sequence[StatisticsBlock]) -> None:
        """Hands statistics to the push thread and returns at once.

        A block not yet sent is replaced by a newer one of the same key.

        Args:
            blocks: The statistics; their arrays must not be modified afterwards.

        Raises:
            TypeError: If an element is not a StatisticsBlock.
        """
        for block in blocks:
            if not isinstance(block, StatisticsBlock):
                raise TypeError(f"push() takes StatisticsBlock objects, got {type(block).__name__}")
        self._pusher.offer(blocks)

    def latest(self) -> dict[str, PreconditionerBlock]:
        """Returns every root received so far, the newest per key, at once.

        Returns:
            key -> PreconditionerBlock (a new dict; the roots are read-only arrays).
        """
        return self._puller.latest()

    def failures(self) -> dict[str, RootFailure]:
        """Returns the roots the service reported failed and the client holds no newer root of.

        A failed root does not come unless a newer statistic of its key is pushed
        (the previous root stays); see `ClientStatus.root_failures_seen` for the count.

        Returns:
            key -> RootFailure (a new dict).
        """
        return self._puller.failures()

    def status(self) -> ClientStatus:
        """Returns what the client has done so far."""
        state, pusher, puller = self._state, self._pusher, self._puller
        with state.lock:
            return ClientStatus(
                connected=state.connected,
                incarnation=state.incarnation,
                restarts_seen=state.restarts_seen,
                pushes_sent=pusher.pushes_sent,
                blocks_sent=pusher.blocks_sent,
                blocks_replaced=pusher.blocks_replaced,
                pending_blocks=pusher.pending_blocks,
                push_failures=pusher.push_failures,
                blocks_rejected=pusher.blocks_rejected,
                last_rejections=tuple(pusher.rejections),
                pulls=puller.pulls,
                pull_failures=puller.pull_failures,
                preconditioners_received=puller.received,
                last_push_latency_s=pusher.latency_s,
                last_pull_latency_s=puller.latency_s,
                last_error=state.last_error,
                permanent_error=(
                    None if state.permanent_error is None else str(state.permanent_error)
                ),
                root_failures_seen=puller.failures_seen,
            )

    def check(self) -> None:
        """Raises if the service refused this client for good; returns at once otherwise.

        Transient failures (the service down, slow or restarting) never raise: the
        client retries them. Call this between inner loops.

        Raises:
            PermanentServiceError: If a push or pull failed with UNAUTHENTICATED or
                PERMISSION_DENIED; the client then sends nothing more.
        """
        with self._state.lock:
            error = self._state.permanent_error
        if error is not None:
            raise error

    def pull_now(self) -> None:
        """Asks the pull thread to pull at once instead of at its next interval; returns at once."""
        self._state.wake_puller.set()

    def drop_run(self, timeout_s: float = 10.0) -> int:
        """Asks the service to forget this run; blocks, so call it outside the training loop.

        A trainer restarted from a checkpoint under the same run_id pushes steps older
        than those the service already holds, which are rejected as stale: dropping the
        run first starts it afresh. Roots already received are forgotten too (and a
        pull in flight across the drop is discarded), so `latest()` then holds only
        roots of the fresh run.

        Args:
            timeout_s: Deadline of the RPC.

        Returns:
            How many blocks the service released.

        Raises:
            grpc.RpcError: If the service cannot be reached.
        """
        with open_channel(self.address, (), self._tls) as channel:
            reply = pb_grpc.PreconditionerServiceStub(channel).DropRun(
                pb.DropRunRequest(run_id=self.run_id),
                timeout=timeout_s,
                metadata=self._state.metadata,
            )
        self._puller.forget()
        return reply.blocks_released

    def service_statuses(self, timeout_s: float = 5.0) -> list[pb.ServiceStatus]:
        """Asks the service for its figures (GetStatus, listing this run only); blocks.

        Call it off the training loop (the trainer's summaries do, on a thread).

        Args:
            timeout_s: Deadline of the RPC.

        Returns:
            One status (a list, as `ShardedClient.service_statuses` returns one per shard).

        Raises:
            grpc.RpcError: If the service cannot be reached or refuses.
        """
        with open_channel(self.address, (), self._tls) as channel:
            return [
                pb_grpc.PreconditionerServiceStub(channel).GetStatus(
                    pb.StatusRequest(run_id=self.run_id),
                    timeout=timeout_s,
                    metadata=self._state.metadata,
                )
            ]

    def close(self, timeout: float = 5.0) -> None:
        """Stops the threads, cancelling RPCs in flight; idempotent.

        Args:
            timeout: Longest wait for each thread to end.
        """
        if self._state.closing.is_set():
            return
        self._state.close()
        for thread in self._threads:
            thread.join(timeout)
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> PreconditionerClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_arguments(address: str, run_id: str, *, max_matrix_size: int, **positive: float) -> None:
    """Raises ValueError naming the first argument of a client that is out of range."""
    if not address:
        raise ValueError("address must be 'host:port', got an empty string")
    if not run_id:
        raise ValueError("run_id must be a non-empty string")
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if max_matrix_size < 1:
        raise ValueError(f"max_matrix_size must be >= 1, got {max_matrix_size}")
