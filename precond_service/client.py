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
client pushes the newest statistic of every key again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from precond_service import wire
from precond_service.auth import TOKEN_ENV, TlsConfig, open_channel
from precond_service.blocks import PreconditionerBlock, StatisticsBlock
from precond_service.versions import is_newer
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

B = TypeVar("B", StatisticsBlock, PreconditionerBlock)

# Errors that retrying the same request cannot fix: the blocks are dropped.
_PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

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


# Rejections remembered for `ClientStatus.last_rejections`.
_REJECTIONS_KEPT = 10


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
    """Pushes statistics to, and pulls roots from, a service in the background."""

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
        if not address:
            raise ValueError("address must be 'host:port', got an empty string")
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        for name, value in (
            ("pull_interval_s", pull_interval_s),
            ("rpc_timeout_s", rpc_timeout_s),
            ("backoff_initial_s", backoff_initial_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if max_matrix_size < 1:
            raise ValueError(f"max_matrix_size must be >= 1, got {max_matrix_size}")
        self.address = address
        self.run_id = run_id
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls = tls
        self._pull_interval_s = pull_interval_s
        self._rpc_timeout_s = rpc_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._max_matrix_size = max_matrix_size

        self._lock = threading.Lock()
        self._wake_pusher = threading.Condition(self._lock)
        self._closing = threading.Event()
        # Cut the pull thread's wait short (`pull_now`, or the push thread got
        # through after failures), and the push thread's backoff (a pull got through).
        self._wake_puller = threading.Event()
        self._wake_retry = threading.Event()
        self._pending: dict[str, StatisticsBlock] = {}
        self._last_sent: dict[str, StatisticsBlock] = {}
        # Replaced, never mutated, so that `latest` needs no lock.
        self._cache: dict[str, PreconditionerBlock] = {}
        # Bumped by drop_run: a pull that was in flight across it is discarded.
        self._generation = 0
        self._calls: set[grpc.Future | grpc.Call] = set()
        self._channel: grpc.Channel | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

        self._connected = False
        self._incarnation: str | None = None
        self._restarts_seen = 0
        self._pushes_sent = 0
        self._blocks_sent = 0
        self._blocks_replaced = 0
        self._push_failures = 0
        self._blocks_rejected = 0
        self._rejections: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=_REJECTIONS_KEPT
        )
        self._pulls = 0
        self._pull_failures = 0
        self._received = 0
        self._push_latency: float | None = None
        self._pull_latency: float | None = None
        self._last_error: str | None = None
        self._permanent_error: PermanentServiceError | None = None

    # The trainer's side: none of these block on the network.

    def start(self) -> None:
        """Starts the push and pull threads; does not wait for the service.

        Raises:
            RuntimeError: If the client was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("start() after close(): create a new PreconditionerClient")
            if self._channel is not None:
                return
            self._channel = open_channel(
                self.address,
                _channel_options(self._max_matrix_size, self._backoff_max_s),
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
                target=self._push_loop, args=(push_call,), name="precond-push", daemon=True
            ),
            threading.Thread(
                target=self._pull_loop, args=(stub,), name="precond-pull", daemon=True
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
        with self._lock:
            for block in blocks:
                held = self._pending.get(block.key)
                if held is not None:
                    if not is_newer(block.step, held.step):
                        continue
                    self._blocks_replaced += 1
                self._pending[block.key] = block
            self._wake_pusher.notify()

    def latest(self) -> dict[str, PreconditionerBlock]:
        """Returns every root received so far, the newest per key, at once.

        Returns:
            key -> PreconditionerBlock (a new dict; the roots are read-only arrays).
        """
        return dict(self._cache)

    def status(self) -> ClientStatus:
        """Returns what the client has done so far."""
        with self._lock:
            return ClientStatus(
                connected=self._connected,
                incarnation=self._incarnation,
                restarts_seen=self._restarts_seen,
                pushes_sent=self._pushes_sent,
                blocks_sent=self._blocks_sent,
                blocks_replaced=self._blocks_replaced,
                pending_blocks=len(self._pending),
                push_failures=self._push_failures,
                blocks_rejected=self._blocks_rejected,
                last_rejections=tuple(self._rejections),
                pulls=self._pulls,
                pull_failures=self._pull_failures,
                preconditioners_received=self._received,
                last_push_latency_s=self._push_latency,
                last_pull_latency_s=self._pull_latency,
                last_error=self._last_error,
                permanent_error=(
                    None if self._permanent_error is None else str(self._permanent_error)
                ),
            )

    def check(self) -> None:
        """Raises if the service refused this client for good; returns at once otherwise.

        Transient failures (the service down, slow or restarting) never raise: the
        client retries them. Call this between inner loops.

        Raises:
            PermanentServiceError: If a push or pull failed with UNAUTHENTICATED or
                PERMISSION_DENIED; the client then sends nothing more.
        """
        with self._lock:
            error = self._permanent_error
        if error is not None:
            raise error

    def pull_now(self) -> None:
        """Asks the pull thread to pull at once instead of at its next interval; returns at once."""
        self._wake_puller.set()

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
                pb.DropRunRequest(run_id=self.run_id), timeout=timeout_s, metadata=self._metadata
            )
        with self._lock:
            self._generation += 1
            self._cache = {}
        return reply.blocks_released

    def close(self, timeout: float = 5.0) -> None:
        """Stops the threads, cancelling RPCs in flight; idempotent.

        Args:
            timeout: Longest wait for each thread to end.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            self._wake_puller.set()
            self._wake_retry.set()
            self._wake_pusher.notify_all()
            calls = list(self._calls)
        for call in calls:
            call.cancel()
        for thread in self._threads:
            thread.join(timeout)
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> PreconditionerClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Push thread.

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

    def _stopped(self) -> bool:
        """Whether the threads should end: closing, or refused for good."""
        return self._closing.is_set() or self._permanent_error is not None

    def _fail_if_permanent(self, rpc: str, code: grpc.StatusCode, details: str | None) -> bool:
        """Stops both threads for good if `code` is one no retry gets past.

        Returns:
            Whether it did.
        """
        advice = _FATAL_CODES.get(code)
        if advice is None:
            return False
        error = PermanentServiceError(
            code, f"{rpc} to {self.address} failed with {code.name} ({details}); {advice}"
        )
        with self._lock:
            if self._permanent_error is not None:
                return True
            self._permanent_error = error
            self._wake_pusher.notify_all()
        self._wake_puller.set()
        self._wake_retry.set()
        logger.error("%s; the client stops pushing and pulling", error)
        return True

    def _push_once(
        self, push_call: grpc.StreamUnaryMultiCallable, blocks: list[StatisticsBlock]
    ) -> bool:
        """Sends blocks in one streaming RPC; returns whether the service answered it.

        False: the push failed and is retried after a backoff (transient), or the
        client stopped for good (see `_fail_if_permanent`).
        """
        local_rejections: list[tuple[str, str]] = []
        start = time.perf_counter()
        future = push_call.future(
            self._requests(blocks, local_rejections),
            timeout=self._rpc_timeout_s,
            metadata=self._metadata,
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

    def _requests(
        self, blocks: list[StatisticsBlock], local_rejections: list[tuple[str, str]]
    ) -> Iterator[bytes]:
        """Serialized messages of about PUSH_BATCH_BYTES of blocks (a large one alone)."""
        batch: list[StatisticsBlock] = []
        batch_bytes = 0
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
            if batch and batch_bytes + array.nbytes > wire.PUSH_BATCH_BYTES:
                yield wire.encode_push_request(self.run_id, batch)
                batch, batch_bytes = [], 0
            batch.append(dataclasses.replace(block, statistics=array))
            batch_bytes += array.nbytes
        if batch:
            yield wire.encode_push_request(self.run_id, batch)

    def _count_rejections(self, rejections: list[tuple[str, str]]) -> None:
        """Records rejections; the caller holds the lock."""
        self._blocks_rejected += len(rejections)
        self._rejections.extend(rejections)
        for key, reason in rejections[:3]:
            logger.warning("block %r rejected: %s", key, reason)

    # Pull thread.

    def _pull_loop(self, stub: pb_grpc.PreconditionerServiceStub) -> None:
        failures = 0
        while not self._stopped():
            self._wake_puller.clear()
            if self._pull_once(stub):
                if failures:  # the service is back: retry a failed push now
                    self._wake_retry.set()
                failures = 0
                self._wake_puller.wait(self._pull_interval_s)
            else:
                failures += 1
                self._wake_puller.wait(max(self._pull_interval_s, self._backoff(failures)))

    def _pull_once(self, stub: pb_grpc.PreconditionerServiceStub) -> bool:
        """Fetches roots newer than the cache; returns whether the RPC succeeded."""
        with self._lock:
            cache, generation = self._cache, self._generation
        request = pb.GetPreconditionersRequest(
            run_id=self.run_id, known_steps={key: b.stats_step for key, b in cache.items()}
        )
        start = time.perf_counter()
        call = stub.GetPreconditioners(
            request, timeout=self._rpc_timeout_s, metadata=self._metadata
        )
        self._track(call)
        received: list[PreconditionerBlock] = []
        incarnation = ""
        try:
            for reply in call:
                incarnation = reply.incarnation or incarnation
                received += [wire.message_to_preconditioner(root) for root in reply.roots]
        except grpc.RpcError as e:
            with self._lock:
                self._pull_failures += 1
                self._last_error = f"GetPreconditioners: {e.code().name}: {e.details()}"
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._connected = False
            self._fail_if_permanent("GetPreconditioners", e.code(), e.details())
            return False
        except ValueError as e:
            with self._lock:
                self._pull_failures += 1
                self._last_error = f"GetPreconditioners: malformed root: {e}"
            return False
        finally:
            with self._lock:
                self._calls.discard(call)
        latency = time.perf_counter() - start
        with self._lock:
            if received and generation == self._generation:
                updated = dict(self._cache)
                keep_newest(updated, received)
                self._cache = updated
            self._connected = True
            self._pulls += 1
            self._received += len(received)
            self._pull_latency = latency
        if incarnation:
            self._saw_incarnation(incarnation)
        return True

    # Both threads.

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
