# Over 400 lines: one servicer class, whose handlers share its admission and chunk helpers.
"""The precond.v1 RPC handlers: a thin asyncio servicer over `RootService`, from the .proto.

Handlers run on the server's event loop (`server.py`); the service's own work
(validating and queueing statistics, encoding roots, status, dropping a run) runs
in a thread pool, so the loop stays free to answer other clients. Streams are
admitted and timed by `stream_limits.StreamLimits`.

Hostile or broken requests fail alone and leave the service serving: bytes that do
not parse, or a bad run_id or known_steps, fail the RPC with INVALID_ARGUMENT; a
request beyond `max_blocks_per_request` (checked on the wire before parsing, see
`wire.parse_request`, and over all messages of a push) with RESOURCE_EXHAUSTED; a bad
block is rejected alone, with its reason, in the push's reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from precond_service.common import wire
from precond_service.common.blocks import RootFailure
from precond_service.server.budget import BudgetExceededError
from precond_service.server.chunks import ChunkAssembler
from precond_service.server.service import RootService
from precond_service.server.service_records import Rejection
from precond_service.server.store import PublishedRoot
from precond_service.server.stream_limits import StreamLimits, StreamRefusedError
from protos import precond_service_pb2 as pb

T = TypeVar("T")

# Threads doing the service's work for pushes and pulls (validation, encoding).
_DATA_THREADS = 4

# Threads for GetStatus and DropRun, apart so that they never wait behind pushes.
_CONTROL_THREADS = 2


class PreconditionerServicer:
    """Translates precond.v1 RPCs to calls on a RootService (async handlers)."""

    def __init__(
        self,
        service: RootService,
        limits: StreamLimits,
        *,
        auth_rejected: Callable[[], int] | None,
    ) -> None:
        """Wraps a service.

        Args:
            service: The service that does the work.
            limits: What streams are admitted, and for how long.
            auth_rejected: With a token, how many RPCs were refused for it so far;
                None without a token (then DropRun refuses a run_digest).
        """
        self._service = service
        self._limits = limits
        # Push messages arrive as bytes: they are counted in the budget, then parsed.
        self._parse_push = _lenient_parser(
            pb.PushStatisticsRequest, service.config.max_blocks_per_request
        )
        self._auth_rejected = auth_rejected
        # Parses requests, validates pushes, encodes pulls.
        self.data_executor = futures.ThreadPoolExecutor(
            _DATA_THREADS, thread_name_prefix="precond-data"
        )
        self._control = futures.ThreadPoolExecutor(
            _CONTROL_THREADS, thread_name_prefix="precond-control"
        )

    def close(self) -> None:
        """Stops the thread pools (after the server has stopped)."""
        self.data_executor.shutdown(wait=False, cancel_futures=True)
        self._control.shutdown(wait=False, cancel_futures=True)

    async def PushStatistics(  # noqa: N802  (gRPC's method name)
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushStatisticsReply:
        """Validates and queues every statistic of every message of the stream.

        gRPC receives at most `wire.MAX_REQUEST_BYTES` of a message, one message at
        a time per stream. Each message is counted in the byte budget (2x its size:
        its bytes, then the parsed message and a block's data) before it is parsed, and
        released once its blocks are queued; one that does not fit ends the stream
        with RESOURCE_EXHAUSTED naming the flag. A stream that declares its largest
        message (`wire.MESSAGE_BYTES_METADATA`, as `PreconditionerClient` does) is
        instead admitted before any of it is read, room for one such message being
        held until it ends; a message larger than declared ends it. Statistics sent
        in chunks are reassembled (`chunks.ChunkAssembler`), each reserved whole at
        its first chunk. A statistic that does not fit in the budget beside its
        float64 root (`Scheduler.submit`), or a stream past `max_blocks_per_request`
        statistics, ends the stream with RESOURCE_EXHAUSTED naming the flag; the
        statistics before it stay accepted.
        """
        reply = pb.PushStatisticsReply(incarnation=self._service.incarnation)
        limit = self._service.config.max_blocks_per_request
        declared = wire.declared_message_bytes(context.invocation_metadata())
        if declared is not None:  # No message can be larger than gRPC's receive limit.
            declared = min(declared, wire.MAX_REQUEST_BYTES)
        assembler = ChunkAssembler(
            self._service.budget, max_matrix_size=self._service.config.max_matrix_size
        )
        blocks, run_id = 0, ""
        try:
            with (
                self._limits.admit(context.peer()) as deadline,
                self._held(2 * (declared or 0), "this push stream (2x its declared message size)"),
            ):
                async for data in deadline.messages(request_iterator, prefetch=False):
                    counted = 0 if declared is not None else 2 * len(data)
                    with self._held(counted, "this push message (2x its size)"):
                        request = _checked(await _run(self.data_executor, self._parse_push, data))
                        # Not held while suspended: a refused stream's frames can stay in
                        # a reference cycle (gRPC's abort) until the collector runs.
                        del data
                        run_id = request.run_id
                        blocks += sum(1 for block in request.blocks if not block.data_offset)
                        if blocks > limit:
                            raise StreamRefusedError(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this push carries more than max_blocks_per_request={limit} "
                                "blocks; send each key at most once per push",
                            )
                        nbytes = request.ByteSize()
                        if declared is not None and nbytes > declared:
                            raise StreamRefusedError(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"a message of {nbytes} bytes is larger than the {declared} "
                                f"the stream declared in {wire.MESSAGE_BYTES_METADATA}",
                            )
                        try:
                            accepted, rejections = await _run(
                                self.data_executor, self._push_message, request, assembler
                            )
                        except BudgetExceededError as e:
                            raise StreamRefusedError(
                                grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
                            ) from None
                        del request
                    reply.accepted += accepted
                    _add_rejections(reply, rejections)
            unfinished = assembler.close()
            if unfinished:
                _add_rejections(reply, self._service.push(run_id, unfinished)[1])
        finally:
            assembler.close()  # A stream that failed: its statistic in progress is released.
        return reply

    def _push_message(
        self, request: pb.PushStatisticsRequest, assembler: ChunkAssembler
    ) -> tuple[int, list[Rejection]]:
        """Reassembles the message's chunks and pushes what is complete (a data thread)."""
        return self._service.push(
            request.run_id, [item for block in request.blocks for item in assembler.add(block)]
        )

    @contextlib.contextmanager
    def _held(self, nbytes: int, what: str) -> Iterator[None]:
        """Holds `nbytes` of the byte budget while the block runs.

        Raises:
            StreamRefusedError: RESOURCE_EXHAUSTED naming the flag, if they do not fit.
        """
        try:
            self._service.budget.reserve(nbytes, what)
        except BudgetExceededError as e:
            raise StreamRefusedError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        try:
            yield
        finally:
            self._service.budget.release(nbytes)

    async def GetPreconditioners(  # noqa: N802
        self, request: Message | _Refused, context: grpc.aio.ServicerContext
    ) -> None:
        """Streams the roots newer than the client holds, as published now.

        Writes serialized GetPreconditionersReply messages, at least one, each with
        the incarnation (see `wire.encode_preconditioner_replies`); each must be
        taken by the client within the stream's deadlines.
        """
        request = _checked(request)
        with self._limits.admit(context.peer()) as deadline:
            roots, failures = await _run(
                self.data_executor,
                self._service.preconditioners,
                request.run_id,
                request.known_steps,
            )
            replies = _encode_replies(self._service.incarnation, roots, failures)
            while (reply := await _run(self.data_executor, next, replies, None)) is not None:
                await deadline.within(context.write(reply), "taking the next message")

    async def GetStatus(  # noqa: N802
        self, request: Message | _Refused, context: grpc.aio.ServicerContext
    ) -> pb.ServiceStatus:
        """Returns the service's figures."""
        request = _checked(request)
        status = await _run(self._control, self._service.status, request.run_id)
        status.streams_open = self._limits.open_streams
        status.streams_refused = self._limits.refused
        status.streams_timed_out = self._limits.timed_out
        status.auth_rejected = self._auth_rejected() if self._auth_rejected else 0
        return status_message(status)

    async def DropRun(  # noqa: N802
        self, request: Message | _Refused, context: grpc.aio.ServicerContext
    ) -> pb.DropRunReply:
        """Releases everything held for a run."""
        request = _checked(request)
        if not request.run_digest:
            released = await _run(self._control, self._service.drop_run, request.run_id)
        elif request.run_id:
            raise ValueError("DropRun takes a run_id or a run_digest, not both")
        elif self._auth_rejected is None:
            raise StreamRefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "DropRun by run_digest needs a service started with a token (--token_file), "
                "so that only its holders can drop other clients' runs; drop by run_id instead",
            )
        else:
            released = await _run(
                self._control, self._service.drop_run_by_digest, request.run_digest
            )
        return pb.DropRunReply(dropped=released > 0, blocks_released=released)


def _add_rejections(reply: pb.PushStatisticsReply, rejections: list[Rejection]) -> None:
    reply.rejected.extend(
        pb.BlockError(key=r.key, step=r.step, reason=r.reason) for r in rejections
    )


def status_message(status: object) -> pb.ServiceStatus:
    """The ServiceStatus message of a `service_records.ServiceStatus`."""
    fields = dataclasses.asdict(status)
    runs = [pb.RunStatus(**run) for run in fields.pop("runs")]
    return pb.ServiceStatus(runs=runs, **fields)


def _encode_replies(
    incarnation: str, roots: list[PublishedRoot], failures: list[RootFailure]
) -> Iterator[bytes]:
    """The reply messages of a pull, encoded one at a time as they are asked for."""
    encoded = (wire.encode_preconditioner(_root_header(root), root.root) for root in roots)
    return wire.encode_preconditioner_replies(
        incarnation,
        encoded,
        failures=[
            pb.BlockFailure(key=f.key, stats_step=f.stats_step, reason=f.reason) for f in failures
        ],
    )


async def _run(executor: futures.Executor, function: Callable[..., T], *args: object) -> T:
    """Runs `function(*args)` in a thread of `executor`; returns its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(function, *args))


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


def _checked(request: Message | _Refused) -> Message:
    """The request, or StreamRefusedError with the status of bytes that were refused."""
    if isinstance(request, _Refused):
        raise StreamRefusedError(request.code, request.message)
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


def add_servicer(
    servicer: PreconditionerServicer, server: grpc.aio.Server, max_entries: int
) -> None:
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
        parse = _lenient_parser(getattr(pb, method.input_type.name), entries)
        handlers[method.name] = _HANDLER_KINDS[streaming](
            _with_status(
                getattr(servicer, method.name),
                _parsing(parse, servicer.data_executor, request_streaming=streaming[0]),
            ),
            # Requests arrive as bytes and are parsed off the event loop (`_parsing`).
            request_deserializer=None,
            response_serializer=_serializer(getattr(pb, method.output_type.name)),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),)
    )


def _parsing(
    parse: Callable[[bytes], Message | _Refused],
    executor: futures.Executor,
    *,
    request_streaming: bool,
) -> Callable[[object], Awaitable[object]]:
    """Returns what turns a call's request bytes into the parsed request.

    Parsing runs in `executor`, not on the event loop: a large message takes a while,
    and the loop must go on answering health checks and other clients. A request
    stream (PushStatistics) is passed on as bytes: its handler counts each message
    in the byte budget before parsing it.
    """
    if request_streaming:  # PushStatistics counts each message, then parses it.

        async def unparsed(requests: AsyncIterator[bytes]) -> object:
            return requests

        return unparsed

    async def parse_one(data: bytes) -> object:
        return await _run(executor, parse, data)

    return parse_one


def _with_status(method: Callable, parse: Callable[[object], Awaitable[object]]) -> Callable:
    """Wraps an async servicer method so that what it refuses ends the RPC with a status.

    The request (bytes, or a stream of them) is parsed by `parse` first.
    StreamRefusedError ends it with its own code, wire.RequestTooLargeError with
    RESOURCE_EXHAUSTED, any other ValueError with INVALID_ARGUMENT.
    """

    @functools.wraps(method)
    async def handle(request: object, context: grpc.aio.ServicerContext) -> object:
        try:
            return await method(await parse(request), context)
        except StreamRefusedError as e:
            code, message = e.code, e.message
        except wire.RequestTooLargeError as e:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except ValueError as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        # The status is set and the handler returns instead of `context.abort`: the
        # abort's exception would leave the call in a reference cycle (its traceback,
        # the context, the call's state) that only the cyclic collector frees, with
        # whatever gRPC had received of a refused push.
        del request
        context.set_code(code)
        context.set_details(message)
        return None

    return handle


def _has_repeated_field(descriptor: Descriptor) -> bool:
    """Whether a message type has a repeated (or map) field."""
    return any(_is_repeated(field) for field in descriptor.fields)


def _is_repeated(field: FieldDescriptor) -> bool:
    # Newer protobuf runtimes have `is_repeated` and no longer `label`; older ones the reverse.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED
