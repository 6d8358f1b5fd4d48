"""Builds and runs the gRPC server: handlers (`servicer`), health, auth, and `serve`.

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
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from precond_service import wire
from precond_service.events import Event, EventLog
from precond_service.service import RootService
from precond_service.service_records import ServiceConfig
from precond_service.servicer import PreconditionerServicer, add_servicer

logger = logging.getLogger(__name__)

# Threads answering RPCs; pushes and pulls are short, so a few suffice.
_RPC_THREADS = 16

# RPCs served at once; more wait in gRPC's queue. Bounds memory for big pushes.
_MAX_CONCURRENT_RPCS = 64


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
    add_servicer(PreconditionerServicer(service), server, service.config.max_blocks_per_request)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _set_health(health_servicer, serving=False)
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
        self.service.events.write(Event.SERVICE_STOPPED)
        logger.info("precond_service stopped")


def serve(
    config: ServiceConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    events: EventLog | None = None,
) -> RunningServer:
    """Starts the workers and the server; returns once it reports SERVING.

    Health follows the dispatcher afterwards: NOT_SERVING while it keeps failing
    (see `RootService.add_serving_listener`), SERVING again once it works.

    Args:
        config: The service configuration.
        host: Interface to bind; loopback by default.
        port: Port to bind; 0 picks a free one.
        token: Shared secret for RPCs, or None for none.
        credentials: TLS credentials (`auth.server_credentials`), or None for plaintext.
        events: Where the service's events go (SERVICE_STARTED, ..., SERVICE_STOPPED);
            None writes none. `RunningServer.stop` does not close it.

    Returns:
        The running server.

    Raises:
        RuntimeError: If the port cannot be bound or the workers do not start.
    """
    service = RootService(config, events)
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
    _set_health(health_servicer, serving=True)
    service.add_serving_listener(lambda serving: _set_health(health_servicer, serving=serving))
    running = RunningServer(service, server, health_servicer, host, bound_port)
    logger.info(
        "precond_service listening on %s (%s, workers=%d, method=%s, incarnation=%s)",
        running.address,
        "TLS" if credentials is not None else "plaintext",
        config.workers,
        config.method,
        service.incarnation,
    )
    service.events.write(
        Event.SERVICE_STARTED,
        incarnation=service.incarnation,
        address=running.address,
        workers=config.workers,
    )
    return running


def _set_health(health_servicer: health.HealthServicer, *, serving: bool) -> None:
    """Sets the overall and the PreconditionerService health status."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", wire.SERVICE_NAME):
        health_servicer.set(name, status)
