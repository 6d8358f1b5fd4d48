"""Builds and runs the gRPC server: handlers (`servicer`), health, auth, and `serve`.

`serve(config, host=..., port=...)` starts the workers, binds the port, reports
SERVING on the standard `grpc.health.v1.Health` service and returns a
`RunningServer`; `RunningServer.stop` is the graceful shutdown (NOT_SERVING first,
in-flight RPCs get `grace_s` to finish, then the workers stop).

The server is a `grpc.aio` server on an event loop of its own thread: an idle or
slow stream holds no thread, so health checks, GetStatus and the other clients'
RPCs are answered whatever some clients leave open; `stream_limits` bounds how
many streams a peer may hold and for how long.

With a token, every RPC but the health checks must carry the metadata
`authorization: Bearer <token>`, or it fails with UNAUTHENTICATED; each refusal is
counted in the status (`auth_rejected`) and logged, at most once per 10 s, with
the peer and never the token. The token is a shared secret against accidents and
strangers; without TLS credentials (see `auth.server_credentials`) the channel is
not encrypted and the token travels in the clear, so serve a host other than
loopback over TLS, or reach it through an SSH tunnel or a private network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from precond_service.common import wire
from precond_service.common.events import Event, EventLog
from precond_service.server.service import RootService
from precond_service.server.service_records import ServiceConfig
from precond_service.server.servicer import PreconditionerServicer, add_servicer
from precond_service.server.stream_limits import StreamLimits
from precond_service.server.throttle import Throttle

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Refused tokens are logged in one line per this many seconds at most, with a count.
_LOG_INTERVAL_S = 10.0

# Characters of a client-supplied method name or peer that go into a log line.
_LOGGED_CHARACTERS = 200


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without `authorization: Bearer <token>`, except health checks.

    Counts the refusals (`rejected`) and logs them at most once per `_LOG_INTERVAL_S`,
    with the method and the peer, never the token given.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._to_log = Throttle(_LOG_INTERVAL_S)
        self.rejected = 0

    def _note_rejected(self, method: str, peer: str) -> None:
        self.rejected += 1  # On the event loop's thread only.
        count = self._to_log.add()
        if count:
            logger.warning(
                "refused %d RPC(s) with a missing or wrong token since the last report; "
                "latest: %s from %s",
                count,
                method[:_LOGGED_CHARACTERS],
                peer[:_LOGGED_CHARACTERS],
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Passes the RPC on, or answers UNAUTHENTICATED without the right token."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc.health.v1."):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return handler
        return self._abort_handler(handler, method)

    def _abort_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """Returns a handler of the same kind as `handler` that fails UNAUTHENTICATED."""

        async def abort(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
            self._note_rejected(method, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token: send 'authorization: Bearer <token>'",
            )

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


class _LoopThread:
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="precond-grpc-loop", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Awaitable[T]) -> T:
        """Runs `coroutine` on the loop; waits for and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        """Stops the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _server_options(config: ServiceConfig) -> list[tuple[str, int]]:
    return [
        # What gRPC buffers of a stream before the service sees it: at most one
        # message of 4 MiB + 64 KiB; a larger statistic is sent in chunks.
        ("grpc.max_receive_message_length", wire.MAX_REQUEST_BYTES),
        # No flow-control window beyond gRPC's 64 KiB lookahead per stream (the
        # bandwidth-delay probe would grow it to many MiB): a stream's next message
        # comes in once the service asks for it.
        ("grpc.http2.bdp_probe", 0),
        # A root travels in one message: room for the largest n x n float64 root
        # (128 MiB + 1 MiB for n = 4096).
        ("grpc.max_send_message_length", wire.max_message_bytes(config.max_matrix_size)),
        # Refuse a second server on the same port instead of sharing it silently.
        ("grpc.so_reuseport", 0),
        # Tolerate idle clients' keepalive pings every 20 s or more.
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ]


@dataclasses.dataclass
class _Built:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    servicer: PreconditionerServicer


async def _build_server(
    service: RootService,
    *,
    address: str,
    token: str | None,
    credentials: grpc.ServerCredentials | None,
) -> _Built:
    """Builds (does not start) the aio server around a service; runs on its loop.

    Raises:
        RuntimeError: If the address cannot be bound.
    """
    config = service.config
    limits = StreamLimits(
        max_streams=config.max_streams,
        max_streams_per_peer=config.max_streams_per_peer,
        idle_timeout_s=config.stream_idle_timeout_s,
        timeout_s=config.stream_timeout_s,
    )
    interceptor = _TokenInterceptor(token) if token else None
    server = grpc.aio.server(
        interceptors=[interceptor] if interceptor else [], options=_server_options(config)
    )
    servicer = PreconditionerServicer(
        service, limits, auth_rejected=(lambda: interceptor.rejected) if interceptor else None
    )
    add_servicer(servicer, server, config.max_blocks_per_request)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, serving=False)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise RuntimeError(f"could not bind {address}: {e}") from e
    if port == 0:
        raise RuntimeError(f"could not bind {address}; is the port in use?")
    return _Built(server, port, health_servicer, servicer)


@dataclasses.dataclass
class RunningServer:
    """A started service: its address, and `stop` for graceful shutdown.

    Attributes:
        service: The service behind the server.
        server: The gRPC aio server (it runs on `_loop`).
        health: Its health servicer.
        host: Host it is bound to.
        port: Port it is bound to.
    """

    service: RootService
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    host: str
    port: int
    _loop: _LoopThread
    _servicer: PreconditionerServicer
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
        self._loop.call(self._stop_server(grace_s))
        self._loop.close()
        self._servicer.close()
        self.service.stop()
        self.service.events.write(Event.SERVICE_STOPPED)
        logger.info("precond_service stopped")

    async def _stop_server(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


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
    loop = _LoopThread()
    try:
        built = loop.call(
            _build_server(
                service, address=f"{bind_host}:{port}", token=token, credentials=credentials
            )
        )
        _start_workers_and_server(service, loop, built)
    except Exception:
        loop.close()
        raise
    loop.call(_set_health(built.health, serving=True))
    service.add_serving_listener(lambda serving: _set_health_soon(loop, built.health, serving))
    running = RunningServer(
        service, built.server, built.health, host, built.port, loop, built.servicer
    )
    _announce(running, "TLS" if credentials is not None else "plaintext")
    return running


def _start_workers_and_server(service: RootService, loop: _LoopThread, built: _Built) -> None:
    """Starts the workers, then the server; stops the workers if the server fails."""
    service.start()
    try:
        loop.call(built.server.start())
    except Exception:
        service.stop()
        raise


def _announce(running: RunningServer, transport: str) -> None:
    """Logs that the service listens, and writes SERVICE_STARTED."""
    service, config = running.service, running.service.config
    logger.info(
        "precond_service listening on %s (%s, workers=%d, method=%s, incarnation=%s)",
        running.address,
        transport,
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


def _set_health_soon(loop: _LoopThread, health_servicer: object, serving: bool) -> None:
    """Sets health from another thread (the dispatcher's) without waiting for it."""
    coroutine = _set_health(health_servicer, serving=serving)
    try:
        asyncio.run_coroutine_threadsafe(coroutine, loop.loop)
    except RuntimeError:  # The server has stopped: nobody asks any more.
        coroutine.close()


async def _set_health(health_servicer: health_aio.HealthServicer, *, serving: bool) -> None:
    """Sets the overall and the PreconditionerService health status."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", wire.SERVICE_NAME):
        await health_servicer.set(name, status)
