"""The precond.v1 RPC handlers: a thin servicer over `RootService`, registered from the .proto.

Hostile or broken requests fail alone and leave the service serving: bytes that do
not parse, or a bad run_id or known_steps, fail the RPC with INVALID_ARGUMENT; a
request beyond `max_blocks_per_request` (checked on the wire before parsing, see
`wire.parse_request`, and over all messages of a push) with RESOURCE_EXHAUSTED; a bad
block is rejected alone, with its reason, in the push's reply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from precond_service import wire
from precond_service.service import RootService
from precond_service.store import PublishedRoot
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

T = TypeVar("T")


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

        Yields serialized GetPreconditionersReply messages, at least one, each with
        the incarnation (see `wire.encode_preconditioner_replies`).
        """
        with _errors_as_status(context):
            roots = self._service.preconditioners(request.run_id, request.known_steps)
        encoded = (wire.encode_preconditioner(_root_header(root), root.root) for root in roots)
        yield from wire.encode_preconditioner_replies(self._service.incarnation, encoded)

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


def _root_header(root: PublishedRoot) -> pb.Preconditioner:
    """Every field of a published root's message but the root itself."""
    return pb.Preconditioner(
        key=root.key,
        stats_step=root.stats_step,
        error=root.error,
        iterations=root.iterations,
        method=root.method,
        compute_seconds=root.compute_seconds,
        published_unix_time=root.published_unix_time,
        ridge_epsilon=root.ridge_epsilon,
    )


# gRPC's handler factory for each (client streaming, server streaming) kind.
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(servicer: PreconditionerServicer, server: grpc.Server, max_entries: int) -> None:
    """Registers the servicer like the generated `add_..._to_server`, parsing leniently.

    Methods, message types and call kinds come from the .proto's service descriptor.

    Args:
        servicer: The servicer.
        server: The server.
        max_entries: Most blocks or known_steps entries in one request message; a
            request type without repeated fields gets none.
    """
    handlers = {}
    for method in wire.SERVICE.methods:
        streaming = (method.client_streaming, method.server_streaming)
        entries = max_entries if _has_repeated_field(method.input_type) else 0
        handlers[method.name] = _HANDLER_KINDS[streaming](
            _checking(getattr(servicer, method.name), request_streaming=streaming[0]),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name), entries),
            response_serializer=_serializer(getattr(pb, method.output_type.name)),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),)
    )


def _checking(method: Callable, *, request_streaming: bool) -> Callable:
    """Wraps a servicer method so that a refused request aborts the RPC with its status."""
    if request_streaming:

        def handle_stream(
            requests: Iterator[Message | _Refused], context: grpc.ServicerContext
        ) -> object:
            return method((_checked(r, context) for r in requests), context)

        return handle_stream

    def handle(request: Message | _Refused, context: grpc.ServicerContext) -> object:
        return method(_checked(request, context), context)

    return handle


def _has_repeated_field(descriptor: Descriptor) -> bool:
    """Whether a message type has a repeated (or map) field."""
    return any(_is_repeated(field) for field in descriptor.fields)


def _is_repeated(field: FieldDescriptor) -> bool:
    # Newer protobuf runtimes have `is_repeated` and no longer `label`; older ones the reverse.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED
