"""The gRPC face of the service: a thin servicer, health, auth, and `serve`.

`serve(config, host=..., port=...)` starts the workers, binds the port, reports
SERVING on the standard `grpc.health.v1.Health` service and returns a
`RunningServer`; `RunningServer.stop` is the graceful shutdown (NOT_SERVING first,
in-flight RPCs get `grace_s` to finish, then the workers stop).

With a token, every RPC but the health checks must carry the metadata
`authorization: Bearer <token>`, or it fails with UNAUTHENTICATED. The token is a
shared secret against accidents and strangers; without TLS credentials (see
`auth.server_credentials`) the channel is not encrypted and the token travels in
the clear, so serve a host other than loopback over TLS, or reach it through an SSH
tunnel or a private network.

Hostile or broken requests fail alone and leave the service serving: bytes that do
not parse, or a bad run_id or known_steps, fail the RPC with INVALID_ARGUMENT; a
request beyond `max_blocks_per_request` (checked on the wire before parsing, see
`wire.parse_request`, and over all messages of a push) with RESOURCE_EXHAUSTED; a bad
block is rejected alone, with its reason, in the push's reply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from precond_service import wire
from precond_service.service import RootService, ServiceConfig
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Threads answering RPCs; pushes and pulls are short, so a few suffice.
_RPC_THREADS = 16

# RPCs served at once; more wait in gRPC's queue. Bounds memory for big pushes.
_MAX_CONCURRENT_RPCS = 64


class PreconditionerServicer(pb_grpc.PreconditionerServiceServicer):
    """Translates precond.v1 RPCs to calls on a RootService."""

    def __init__(self, service: RootService) -> None:
        """Wraps a service.

        Args:
            service: The service that does the work.
        """
        self._service = service

    def PushStatistics(  # noqa: N802  (gRPC's method name)
        self, request_iterator: Iterator[pb.PushStatisticsRequest], context: grpc.ServicerContext
    ) -> pb.PushStatisticsReply:
        """Validates and queues every block of every message of the stream.

        A stream past `max_blocks_per_request` blocks fails RESOURCE_EXHAUSTED; the
        blocks of its earlier messages stay accepted.
        """
        reply = pb.PushStatisticsReply(incarnation=self._service.incarnation)
        limit = self._service.config.max_blocks_per_request
        blocks = 0
        for request in _read_ahead(request_iterator):
            blocks += len(request.blocks)
            if blocks > limit:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this push carries more than max_blocks_per_request={limit} blocks; send "
                    "each key at most once per push",
                )
            accepted, rejections = self._service.push(request.run_id, request.blocks)
            reply.accepted += accepted
            reply.rejected.extend(
                pb.BlockError(key=r.key, step=r.step, reason=r.reason) for r in rejections
            )
        return reply

    def GetPreconditioners(  # noqa: N802
        self, request: pb.GetPreconditionersRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Streams the roots newer than the client holds, as published now.

        Yields serialized Preconditioner messages (see `wire.encode_preconditioner`).
        """
        with _errors_as_status(context):
            roots = self._service.preconditioners(request.run_id, request.known_steps)
        context.send_initial_metadata((("precond-incarnation", self._service.incarnation),))
        for root in roots:
            header = pb.Preconditioner(
                key=root.key,
                stats_step=root.stats_step,
                error=root.error,
                iterations=root.iterations,
                method=root.method,
                compute_seconds=root.compute_seconds,
                published_unix_time=root.published_unix_time,
                ridge_epsilon=root.ridge_epsilon,
            )
            yield wire.encode_preconditioner(header, root.root)

    def GetStatus(  # noqa: N802
        self, request: pb.StatusRequest, context: grpc.ServicerContext
    ) -> pb.ServiceStatus:
        """Returns the service's figures."""
        with _errors_as_status(context):
            status = dataclasses.asdict(self._service.status(request.run_id))
        runs = [pb.RunStatus(**run) for run in status.pop("runs")]
        return pb.ServiceStatus(runs=runs, **status)

    def DropRun(  # noqa: N802
        self, request: pb.DropRunRequest, context: grpc.ServicerContext
    ) -> pb.DropRunReply:
        """Releases everything held for a run."""
        with _errors_as_status(context):
            released = self._service.drop_run(request.run_id)
        return pb.DropRunReply(dropped=released > 0, blocks_released=released)


@contextlib.contextmanager
def _errors_as_status(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns a request the service refuses into an RPC status with its reason.

    wire.RequestTooLargeError aborts with RESOURCE_EXHAUSTED, any other ValueError
    with INVALID_ARGUMENT.
    """
    try:
        yield
    except wire.RequestTooLargeError as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except ValueError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _read_ahead(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Yields from `items`, taking the next ones in a helper thread meanwhile.

    gRPC receives a stream's next message only when the handler asks for it; reading
    ahead overlaps receiving a large statistic with validating the previous one.

    Args:
        items: The iterator (a request stream).
        depth: Items taken ahead at most.

    Yields:
        The items, in order; an exception raised by `items` is raised here.
    """
    taken: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                taken.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def read() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # Raised again in the handler thread.
            put((end, e))

    threading.Thread(target=read, name="precond-read-ahead", daemon=True).start()
    try:
        while True:
            item, error = taken.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


class _Refused:
    """Stands for request bytes that were not parsed; the handler turns it into an error."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


def _lenient_parser(
    message_type: type[Message], max_entries: int
) -> Callable[[bytes], Message | _Refused]:
    """Returns a deserializer that never raises (see `wire.parse_request`).

    gRPC's own handling of a deserializer exception answers INTERNAL and, in a
    client stream, can leave the call half-open so that `server.stop` never
    returns; a refusal reported by the handler is an ordinary error status.
    """

    def parse(data: bytes) -> Message | _Refused:
        try:
            return wire.parse_request(message_type, data, max_entries=max_entries)
        except wire.RequestTooLargeError as e:
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            return _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return parse


def _checked(request: Message | _Refused, context: grpc.ServicerContext) -> Message:
    if isinstance(request, _Refused):
        context.abort(request.code, request.message)
    return request


def _serializer(message_type: type[Message]) -> Callable[[Message | bytes], bytes]:
    """Serializes replies; bytes (already serialized by `wire`) pass through."""

    def serialize(reply: Message | bytes) -> bytes:
        return reply if isinstance(reply, bytes) else message_type.SerializeToString(reply)

    return serialize


def _add_servicer(servicer: PreconditionerServicer, server: grpc.Server, max_entries: int) -> None:
    """Registers the servicer like the generated `add_..._to_server`, parsing leniently.

    Args:
        servicer: The servicer.
        server: The server.
        max_entries: Most blocks or known_steps entries in one request message; the
            other requests have none.
    """
    methods = {  # name: (handler kind, request type, reply type, entries allowed)
        "PushStatistics": (
            grpc.stream_unary_rpc_method_handler,
            pb.PushStatisticsRequest,
            pb.PushStatisticsReply,
            max_entries,
        ),
        "GetPreconditioners": (
            grpc.unary_stream_rpc_method_handler,
            pb.GetPreconditionersRequest,
            pb.Preconditioner,
            max_entries,
        ),
        "GetStatus": (grpc.unary_unary_rpc_method_handler, pb.StatusRequest, pb.ServiceStatus, 0),
        "DropRun": (grpc.unary_unary_rpc_method_handler, pb.DropRunRequest, pb.DropRunReply, 0),
    }
    handlers = {}
    for name, (kind, request_type, reply_type, entries) in methods.items():
        method = getattr(servicer, name)
        if kind is grpc.stream_unary_rpc_method_handler:

            def handle(
                requests: Iterator[Message | _Refused],
                context: grpc.ServicerContext,
                method: Callable = method,
            ) -> object:
                return method((_checked(r, context) for r in requests), context)

        else:

            def handle(
                request: Message | _Refused,
                context: grpc.ServicerContext,
                method: Callable = method,
            ) -> object:
                return method(_checked(request, context), context)

        handlers[name] = kind(
            handle,
            request_deserializer=_lenient_parser(request_type, entries),
            response_serializer=_serializer(reply_type),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),)
    )


class _TokenInterceptor(grpc.ServerInterceptor):
    """Rejects RPCs without `authorization: Bearer <token>`, except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Passes the RPC on, or answers UNAUTHENTICATED without the right token."""
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc.health.v1."):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        return _abort_handler(
            handler, "missing or wrong token: send 'authorization: Bearer <token>'"
        )


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """Returns a handler of the same kind as `handler` that fails UNAUTHENTICATED."""

    def abort(request_or_iterator: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def build_server(
    service: RootService,
    *,
    address: str,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds (does not start) the gRPC server around a service.

    Args:
        service: The service.
        address: "host:port" to bind; port 0 picks a free one.
        token: If set, the shared secret every non-health RPC must carry.
        credentials: TLS credentials (`auth.server_credentials`) to serve over TLS,
            health checks included; None serves plaintext.

    Returns:
        (server, bound port, health servicer); health starts NOT_SERVING.

    Raises:
        RuntimeError: If the address cannot be bound.
    """
    limit = wire.max_message_bytes(service.config.max_matrix_size)
    options = [
        # One statistic travels in one message (no chunking): room for the largest
        # n x n float64 matrix accepted (128 MiB + 1 MiB for n = 4096).
        ("grpc.max_receive_message_length", limit),
        # A root is float64 and travels in one message too.
        ("grpc.max_send_message_length", limit),
        # Refuse a second server on the same port instead of sharing it silently.
        ("grpc.so_reuseport", 0),
        # Tolerate idle clients' keepalive pings every 20 s or more.
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_RPC_THREADS, thread_name_prefix="precond-rpc"),
        interceptors=[_TokenInterceptor(token)] if token else [],
        options=options,
        maximum_concurrent_rpcs=_MAX_CONCURRENT_RPCS,
    )
    _add_servicer(PreconditionerServicer(service), server, service.config.max_blocks_per_request)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", wire.SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise RuntimeError(f"could not bind {address}: {e}") from e
    if port == 0:
        raise RuntimeError(f"could not bind {address}; is the port in use?")
    return server, port, health_servicer


@dataclasses.dataclass
class RunningServer:
    """A started service: its address, and `stop` for graceful shutdown.

    Attributes:
        service: The service behind the server.
        server: The gRPC server.
        health: Its health servicer.
        host: Host it is bound to.
        port: Port it is bound to.
    """

    service: RootService
    server: grpc.Server
    health: health.HealthServicer
    host: str
    port: int
    _stopped: bool = False

    @property
    def address(self) -> str:
        """ "host:port" for clients."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Shuts down gracefully; idempotent.

        Health turns NOT_SERVING, new RPCs are refused, in-flight RPCs get `grace_s`
        to finish, then the workers stop.

        Args:
            grace_s: Seconds in-flight RPCs get.
        """
        if self._stopped:
            return
        self._stopped = True
        logger.info("shutting down: NOT_SERVING, %.1f s for in-flight RPCs", grace_s)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.service.stop()
        logger.info("precond_service stopped")


def serve(
    config: ServiceConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Starts the workers and the server; returns once it reports SERVING.

    Args:
        config: The service configuration.
        host: Interface to bind; loopback by default.
        port: Port to bind; 0 picks a free one.
        token: Shared secret for RPCs, or None for none.
        credentials: TLS credentials (`auth.server_credentials`), or None for plaintext.

    Returns:
        The running server.

    Raises:
        RuntimeError: If the port cannot be bound or the workers do not start.
    """
    service = RootService(config)
    bind_host = f"[{host}]" if ":" in host else host
    server, bound_port, health_servicer = build_server(
        service, address=f"{bind_host}:{port}", token=token, credentials=credentials
    )
    service.start()
    try:
        server.start()
    except Exception:
        service.stop()
        raise
    for name in ("", wire.SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(service, server, health_servicer, host, bound_port)
    logger.info(
        "precond_service listening on %s (%s, workers=%d, method=%s, incarnation=%s)",
        running.address,
        "TLS" if credentials is not None else "plaintext",
        config.workers,
        config.method,
        service.incarnation,
    )
    return running
