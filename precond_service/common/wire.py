# Over 400 lines: the encoders and the pre-parse share the wire-format helpers (tags, varints).
"""Converts NumPy arrays and the `blocks` records to and from precond.v1 messages.

Tensors travel as raw row-major little-endian bytes with a dtype and a shape, never
as repeated doubles. Decoding returns a read-only view on the message's bytes, so a
received matrix is not copied until a worker needs it in float64.

Message size limits: the service receives no message larger than
`MAX_REQUEST_BYTES` (4 MiB + 64 KiB), so what gRPC buffers for a stream before the
service sees it is small whatever the client. A client packs its blocks into push
messages of at most `PUSH_BATCH_BYTES` (4 MiB) each (`push_messages`), and a
statistic that does not fit travels in chunks: several BlockStatistics of the same
key and step, each with the matrix's shape and dtype and the bytes of its data from
`data_offset` on; the service reassembles them (`server/chunks.py`). Roots come back
packed into GetPreconditionersReply messages of at most `PUSH_BATCH_BYTES` of roots,
or one larger root alone (`encode_preconditioner_replies`); `max_message_bytes(n)`
is the limit that fits one n x n float64 root, which the client's receive limit and
the service's send limit derive from.

Requests are parsed by `parse_request`, which walks the wire format first and refuses a
message whose repeated fields (blocks, known_steps entries, shape dimensions) hold more
elements than the service accepts: protobuf turns a few bytes per element into tens of
bytes of objects, so a 129 MiB message of tiny entries would otherwise cost gigabytes
before any check could run.

Large messages are serialized by `encode_push_request` and `encode_preconditioner`,
which write the protobuf wire format themselves around the tensor bytes (the field
numbers they write come from the message descriptors): the result
parses as the same message, but costs one copy of the matrix instead of the several
that building and serializing a message with a large bytes field costs (about 2 ms
instead of 70 ms for a 16 MiB statistic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from protos import precond_service_pb2 as pb

# The gRPC service's descriptor, and its full name as the health service reports it.
SERVICE = pb.DESCRIPTOR.services_by_name["PreconditionerService"]
SERVICE_NAME = SERVICE.full_name

# Tensor data packed into one PushStatisticsRequest (or GetPreconditionersReply)
# before starting the next one.
PUSH_BATCH_BYTES = 4 * 1024 * 1024

# The largest message the service receives: a push message of PUSH_BATCH_BYTES and
# room for its headers beyond them.
MAX_REQUEST_BYTES = PUSH_BATCH_BYTES + 64 * 1024

# A statistic that does not fit whole in the room a message has left starts in
# that message only if at least this many of its bytes do; else in the next one.
_MIN_CHUNK_BYTES = 64 * 1024

# The call metadata in which a PushStatistics stream declares the size in bytes of
# its largest message. The service reserves room for it in its byte budget before
# reading the stream, and refuses the stream at once if it does not fit.
MESSAGE_BYTES_METADATA = "precond-message-bytes"

# Numbers of the fields written by hand around tensor bytes, from the .proto.
_BLOCKS_FIELD = pb.PushStatisticsRequest.DESCRIPTOR.fields_by_name["blocks"].number
_STATISTICS_FIELD = pb.BlockStatistics.DESCRIPTOR.fields_by_name["statistics"].number
_ROOT_FIELD = pb.Preconditioner.DESCRIPTOR.fields_by_name["root"].number
_REPLY_ROOTS_FIELD = pb.GetPreconditionersReply.DESCRIPTOR.fields_by_name["roots"].number
_TENSOR_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number

# Room for everything in a message besides the tensor bytes (key, shape, ...).
_MESSAGE_OVERHEAD_BYTES = 1024 * 1024

_DTYPES = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
}

# Most dimensions of a decoded tensor (NumPy allows 64; the service uses 2).
MAX_RANK = 32

# Wire elements (fields, packed values) one request may hold per block or known_steps
# entry it is allowed: a block as the client encodes it has at most 14 (itself, key,
# step, exponent, 3 root settings, data_offset, statistics, shape with its 2 values,
# dtype, data), an entry 3.
_ELEMENTS_PER_ENTRY = 16

# Wire elements allowed besides the entries (run_id and the like).
_ELEMENTS_SLACK = 64

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Bytes that continue a varint; deleting them leaves one byte per packed value.
_VARINT_CONTINUATION = bytes(range(128, 256))

M = TypeVar("M", bound=Message)


class RequestTooLargeError(ValueError):
    """A request holds more blocks or entries than the service accepts in one request."""


def max_message_bytes(max_matrix_size: int) -> int:
    """Returns the gRPC message size limit that fits one n x n float64 matrix.

    Args:
        max_matrix_size: Largest matrix side n that must fit.

    Returns:
        `n * n * 8` bytes plus 1 MiB for the rest of the message, and at least the
        gRPC default of 4 MiB.
    """
    return max(4 * 1024 * 1024, max_matrix_size * max_matrix_size * 8 + _MESSAGE_OVERHEAD_BYTES)


def wire_array(array: np.ndarray) -> np.ndarray:
    """Returns the array as it travels: C-contiguous little-endian float32 or float64.

    float32 stays float32; any other dtype becomes float64. No copy when the array
    already is that.
    """
    array = np.asarray(array)
    wire_dtype = np.dtype("<f4") if array.dtype == np.float32 else np.dtype("<f8")
    return np.ascontiguousarray(array, dtype=wire_dtype)


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encodes an array as a Tensor message.

    float32 stays float32 and float64 stays float64; any other dtype is cast to
    float64.

    Args:
        array: Array of any shape.

    Returns:
        The Tensor, with little-endian row-major bytes.
    """
    array = wire_array(array)
    return pb.Tensor(shape=list(array.shape), dtype=_wire_dtype(array), data=array.tobytes())


def tensor_to_array(tensor: pb.Tensor) -> np.ndarray:
    """Decodes a Tensor message into a read-only array viewing its bytes.

    Args:
        tensor: The message.

    Returns:
        An array of the message's shape and dtype (not copied).

    Raises:
        ValueError: If the dtype is unknown, the rank is above MAX_RANK, a dimension
            is negative, or the byte length does not match the shape.
    """
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(
            f"unknown tensor dtype {tensor.dtype}; use FLOAT32 ({pb.FLOAT32}) or "
            f"FLOAT64 ({pb.FLOAT64})"
        )
    if len(tensor.shape) > MAX_RANK:
        raise ValueError(f"tensor has {len(tensor.shape)} dimensions, more than {MAX_RANK}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # Each access copies the bytes: once only.
    if len(data) != expected:
        raise ValueError(
            f"tensor data has {len(data)} bytes, but shape {list(shape)} of "
            f"{dtype.name} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def tensor_nbytes(tensor: pb.Tensor) -> int:
    """Bytes of the whole array a Tensor message describes (its data may be a chunk).

    Raises:
        ValueError: If the dtype is unknown or a dimension is negative.
    """
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(
            f"unknown tensor dtype {tensor.dtype}; use FLOAT32 ({pb.FLOAT32}) or "
            f"FLOAT64 ({pb.FLOAT64})"
        )
    if len(tensor.shape) > MAX_RANK or any(d < 0 for d in tensor.shape):
        raise ValueError(f"tensor shape {list(tensor.shape)[:MAX_RANK]} is not an array's shape")
    return math.prod(int(d) for d in tensor.shape) * dtype.itemsize


def tensor_dtype(tensor: pb.Tensor) -> np.dtype:
    """The NumPy dtype of a Tensor message whose dtype `tensor_nbytes` accepted."""
    return _DTYPES[tensor.dtype]


def parse_request(message_type: type[M], data: bytes, *, max_entries: int) -> M:
    """Parses a request, refusing one too large to parse before parsing it.

    The wire format is walked first (without building objects) and the elements of
    the message and its known sub-messages are counted: fields, and values of packed
    fields. More than `max_entries * 16 + 64` (room for `max_entries` blocks or
    known_steps entries as clients encode them) is refused, as is a group (wire types
    3 and 4), which no precond.v1 message has.

    Args:
        message_type: The request's message class.
        data: The serialized request.
        max_entries: Most blocks (or known_steps entries) the request may carry.

    Returns:
        The parsed message.

    Raises:
        RequestTooLargeError: If it holds more elements than that.
        ValueError: If the bytes are not a valid message of that type.
    """
    name = message_type.DESCRIPTOR.full_name
    budget = max_entries * _ELEMENTS_PER_ENTRY + _ELEMENTS_SLACK
    try:
        elements = _count_elements(memoryview(data), message_type.DESCRIPTOR, budget)
        if elements > budget:
            raise RequestTooLargeError(
                f"{name} holds more than {budget} fields and values, room for "
                f"{max_entries} blocks or known_steps entries; send fewer in one request"
            )
        return message_type.FromString(data)
    except RequestTooLargeError:
        raise
    except (ValueError, DecodeError) as e:
        raise ValueError(f"request is not a valid {name}: {e}") from e


def _count_elements(data: memoryview, descriptor: Descriptor, budget: int) -> int:
    """Counts the wire elements of a message and its known sub-messages.

    Stops as soon as the count passes `budget`, so the work is bounded by it.

    Returns:
        The count, or a number above `budget` once it is exceeded.

    Raises:
        ValueError: If the bytes are not a sequence of well-formed fields.
    """
    count, position, end = 0, 0, len(data)
    while position < end:
        count += 1
        if count > budget:
            return count
        tag = data[position]
        if tag < 0x80:  # One-byte tags (fields 1 to 15) are all this schema has.
            position += 1
        else:
            tag, position = _read_varint(data, position)
        wire_type, field_number = tag & 7, tag >> 3
        if wire_type == _VARINT:
            _, position = _read_varint(data, position)
        elif wire_type == _I64:
            position += 8
        elif wire_type == _I32:
            position += 4
        elif wire_type == _LEN:
            length, position = _read_varint(data, position)
            payload = data[position : position + length]
            position += length
            field = descriptor.fields_by_number.get(field_number)
            if field is None or position > end:
                continue
            if field.message_type is not None:
                count += _count_elements(payload, field.message_type, budget - count)
            elif field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                # Packed numbers: one value per byte that ends a varint (of 10 bytes at most).
                if len(payload) > 10 * (budget - count):
                    return budget + 1
                count += len(payload.tobytes().translate(None, _VARINT_CONTINUATION))
        else:
            raise ValueError(f"field {field_number} has wire type {wire_type}, unused here")
    if position > end:
        raise ValueError("truncated: a field runs past the end of the message")
    return count


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    """Returns (value, position after it) of the varint at `position`."""
    value, shift = 0, 0
    while True:
        if position >= len(data):
            raise ValueError("truncated: a varint runs past the end of the message")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift >= 70:
            raise ValueError("a varint is longer than 10 bytes")


def statistics_to_message(block: StatisticsBlock) -> pb.BlockStatistics:
    """Encodes a StatisticsBlock for a PushStatisticsRequest.

    Args:
        block: The statistic.

    Returns:
        The BlockStatistics message; a root setting that is None stays unset.
    """
    message = _statistics_header(block)
    message.statistics.CopyFrom(array_to_tensor(block.statistics))
    return message


def _statistics_header(block: StatisticsBlock) -> pb.BlockStatistics:
    """Every field of a block's message but the statistics tensor."""
    return pb.BlockStatistics(
        key=block.key,
        step=int(block.step),
        exponent=int(block.exponent),
        ridge_epsilon=None if block.ridge_epsilon is None else float(block.ridge_epsilon),
        failure_threshold=(
            None if block.failure_threshold is None else float(block.failure_threshold)
        ),
        method=block.method or "",
        ridge_mode=block.ridge_mode or "",
        preconditioner=block.preconditioner or "",
    )


def message_to_preconditioner(message: pb.Preconditioner) -> PreconditionerBlock:
    """Decodes a Preconditioner message received from the service.

    Args:
        message: The message.

    Returns:
        The PreconditionerBlock; its root is a read-only float64 array.

    Raises:
        ValueError: If the root tensor is malformed.
    """
    return PreconditionerBlock(
        key=message.key,
        stats_step=message.stats_step,
        root=tensor_to_array(message.root),
        error=message.error,
        iterations=message.iterations,
        method=message.method,
        compute_seconds=message.compute_seconds,
    )


def encode_push_request(run_id: str, blocks: Sequence[StatisticsBlock]) -> bytes:
    """Serializes a PushStatisticsRequest, copying each matrix once.

    Args:
        run_id: The run.
        blocks: The statistics (converted as `wire_array` says).

    Returns:
        Bytes that parse as `PushStatisticsRequest(run_id=run_id,
        blocks=[statistics_to_message(b) for b in blocks])`.
    """
    return b"".join(push_request_pieces(run_id, blocks))


def declared_message_bytes(metadata: Sequence[tuple[str, str | bytes]] | None) -> int | None:
    """The size a push declares for its largest message, or None where it declares none.

    Raises:
        ValueError: If the declaration is not a non-negative integer (INVALID_ARGUMENT).
    """
    values = [v for k, v in metadata or () if k == MESSAGE_BYTES_METADATA]
    if not values:
        return None
    value = values[-1]
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ValueError(
            f"{MESSAGE_BYTES_METADATA} must be the size in bytes of the stream's largest "
            f"message, a non-negative integer; got {text[:40]!r}"
        )
    return int(text)


def push_request_pieces(run_id: str, blocks: Sequence[StatisticsBlock]) -> list[bytes | memoryview]:
    """The pieces `encode_push_request` joins: headers, and views of the matrices.

    Their lengths sum to the message's size before any matrix is copied, which is
    what a push declares in `MESSAGE_BYTES_METADATA`.
    """
    pieces: list[bytes | memoryview] = [pb.PushStatisticsRequest(run_id=run_id).SerializeToString()]
    for block in blocks:
        block_pieces, length = _with_tensor(
            _statistics_header(block), _STATISTICS_FIELD, wire_array(block.statistics)
        )
        pieces += [_field_header(_BLOCKS_FIELD, length), *block_pieces]
    return pieces


def push_messages(
    run_id: str, blocks: Sequence[StatisticsBlock], *, message_bytes: int = PUSH_BATCH_BYTES
) -> list[list[bytes | memoryview]]:
    """A push's PushStatisticsRequest messages, each as unjoined pieces, chunking large blocks.

    Blocks are packed in order into messages of at most `message_bytes`; a block
    that does not fit in the room a message has left is split into chunks (see
    BlockStatistics.data_offset in the .proto), its first chunk filling that room
    (when at least 64 KiB) and the next ones whole messages. No matrix is copied.

    Args:
        run_id: The run.
        blocks: The statistics (converted as `wire_array` says).
        message_bytes: Most bytes of one message (the service receives at most
            `MAX_REQUEST_BYTES`).

    Returns:
        The messages' pieces; `b"".join(pieces)` of each parses as a request.
    """
    head = pb.PushStatisticsRequest(run_id=run_id).SerializeToString()
    messages: list[list[bytes | memoryview]] = []
    current: list[bytes | memoryview] = [head]
    size = len(head)
    for block in blocks:
        array = wire_array(block.statistics)
        data = memoryview(array).cast("B")
        header, offset = _statistics_header(block), 0
        while True:
            header.data_offset = offset
            fixed = _with_tensor(header, _STATISTICS_FIELD, array, data[:0])[1] + 16
            room = message_bytes - size - fixed
            left = len(data) - offset
            if left > room and room < _MIN_CHUNK_BYTES and len(current) > 1:
                messages.append(current)
                current, size = [head], len(head)
                continue
            # Whole elements per chunk; at least one, so that every chunk makes progress.
            take = left if left <= room else max(room // 8 * 8, 8)
            pieces, length = _with_tensor(
                header, _STATISTICS_FIELD, array, data[offset : offset + take]
            )
            current += [_field_header(_BLOCKS_FIELD, length), *pieces]
            size += len(current[-len(pieces) - 1]) + length
            offset += take
            if offset >= len(data):
                break
            messages.append(current)
            current, size = [head], len(head)
    if len(current) > 1:
        messages.append(current)
    return messages


def pieces_size(pieces: Sequence[bytes | memoryview]) -> int:
    """Bytes of the message the pieces join into."""
    return sum(len(piece) for piece in pieces)


def encode_preconditioner(message: pb.Preconditioner, root: np.ndarray) -> bytes:
    """Serializes a Preconditioner with its root, copying the root once.

    Args:
        message: Every field but `root`.
        root: The root (converted as `wire_array` says).

    Returns:
        Bytes that parse as `message` with `root=array_to_tensor(root)`.
    """
    pieces, _ = _with_tensor(message, _ROOT_FIELD, wire_array(root))
    return b"".join(pieces)


def encode_preconditioner_replies(
    incarnation: str,
    encoded_roots: Iterable[bytes],
    *,
    failures: Sequence[pb.BlockFailure] = (),
    batch_bytes: int = PUSH_BATCH_BYTES,
) -> Iterator[bytes]:
    """Packs serialized Preconditioner messages into GetPreconditionersReply messages.

    Roots are packed together up to `batch_bytes` per message (a larger one goes
    alone, so a message is never larger than the largest root plus its header), and
    at least one message is yielded, so the incarnation arrives with no roots too.

    Args:
        incarnation: The service's incarnation, set in every message.
        encoded_roots: Roots serialized by `encode_preconditioner`.
        failures: Per-key failures, sent in the first message.
        batch_bytes: Most root bytes packed into one message with others.

    Yields:
        Bytes that each parse as a GetPreconditionersReply.
    """
    header = pb.GetPreconditionersReply(incarnation=incarnation).SerializeToString()
    first = pb.GetPreconditionersReply(incarnation=incarnation, failures=failures)
    pieces: list[bytes] = [first.SerializeToString()]
    size = 0
    for root in encoded_roots:
        if size and size + len(root) > batch_bytes:
            yield b"".join(pieces)
            pieces, size = [header], 0
        pieces += [_field_header(_REPLY_ROOTS_FIELD, len(root)), root]
        size += len(root)
    yield b"".join(pieces)  # The last roots, or the only (empty) message.


def _with_tensor(
    message: Message, field_number: int, array: np.ndarray, data: memoryview | None = None
) -> tuple[list[bytes | memoryview], int]:
    """Returns the pieces of `message` with a Tensor of `array` in field `field_number`.

    Protobuf parsers accept fields in any order, so the message's other fields go
    first and the tensor (its shape and dtype, then its data field) is appended.
    `data`, when given, is the chunk of the array's bytes the tensor carries.
    """
    if data is None:
        data = memoryview(array).cast("B")
    tensor = pb.Tensor(shape=list(array.shape), dtype=_wire_dtype(array)).SerializeToString()
    tensor += _field_header(_TENSOR_DATA_FIELD, len(data))
    tensor_length = len(tensor) + len(data)
    outer = message.SerializeToString() + _field_header(field_number, tensor_length)
    return [outer, tensor, data], len(outer) + tensor_length


def _field_header(field_number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (protobuf wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _wire_dtype(array: np.ndarray) -> int:
    return pb.FLOAT32 if array.dtype.itemsize == 4 else pb.FLOAT64
