"""Property tests of the service's decoding path: whatever arrives, ValueError or a valid block.

For arbitrary bytes and arbitrary Tensor and BlockStatistics messages (shapes negative,
huge or of any rank, unknown dtype values, byte lengths that lie), `wire.parse_request`,
`wire.tensor_to_array` and `validation.decode_block` return a well-formed result or
raise ValueError, never another exception, and never allocate more than a little
besides the message itself (measured with tracemalloc, which sees NumPy's buffers).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from precond_service.common import wire
from precond_service.common.roots import METHODS, RIDGE_MODES
from precond_service.server import validation
from protos import precond_service_pb2 as pb

MAX_MATRIX_SIZE = 64

# Bytes a decode may allocate besides the message's own (a float or two, a small error).
ALLOCATION_SLACK = 256 * 1024

INT64 = st.integers(-(2**63), 2**63 - 1)

# Dimensions: mostly small (so that some tensors are valid), sometimes anything.
DIMENSION = st.one_of(st.integers(0, 6), st.integers(-3, 3), INT64, st.just(2**31))

# Known dtypes most of the time, then any int32 an open proto3 enum can hold.
DTYPE = st.one_of(
    st.sampled_from([pb.FLOAT32, pb.FLOAT64]),
    st.just(pb.DTYPE_UNSPECIFIED),
    st.integers(-(2**31), 2**31 - 1),
)

SETTINGS = hypothesis.settings(max_examples=300, deadline=None)


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """Tensors whose data has the right length about half the time, else any length."""
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 6), max_size=4),
            st.lists(DIMENSION, max_size=4),
            st.just([2**31, 2**31]),
            st.lists(st.just(1), min_size=30, max_size=80),
        )
    )
    dtype = draw(st.one_of(st.sampled_from([pb.FLOAT32, pb.FLOAT64]), DTYPE))
    itemsize = {pb.FLOAT32: 4, pb.FLOAT64: 8}.get(dtype, 8)
    size = int(np.prod([max(d, 0) for d in shape], dtype=object)) if shape else 1
    exact = size * itemsize
    if exact <= 4096 and draw(st.booleans()):
        length = max(0, exact + draw(st.sampled_from([0, 0, 0, -1, 1, -itemsize, itemsize])))
        data = draw(st.binary(min_size=length, max_size=length))
    else:
        data = draw(st.binary(max_size=512))
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


@st.composite
def symmetric_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Well-formed symmetric matrices, some with NaN, infinities or huge values."""
    n = draw(st.integers(1, 8))
    values = draw(
        st.lists(
            st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=n * n, max_size=n * n
        )
    )
    matrix = np.array(values, dtype=np.float64).reshape(n, n)
    matrix = np.triu(matrix) + np.triu(matrix, 1).T
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    with np.errstate(over="ignore", invalid="ignore"):
        return wire.array_to_tensor(matrix.astype(dtype))


@st.composite
def block_messages(draw: st.DrawFn) -> pb.BlockStatistics:
    message = pb.BlockStatistics(
        key=draw(st.one_of(st.text(max_size=20), st.just("k" * 1025))),
        step=draw(st.one_of(st.integers(-3, 100), INT64)),
        exponent=draw(st.one_of(st.integers(-3, 8), st.integers(-(2**31), 2**31 - 1))),
    )
    tensor = draw(st.one_of(tensors(), symmetric_tensors(), st.none()))
    if tensor is not None:
        message.statistics.CopyFrom(tensor)
    for name in ("ridge_epsilon", "failure_threshold"):
        value = draw(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
        if value is not None:
            setattr(message, name, value)
    message.method = draw(st.sampled_from(["", "eigh", "schur_newton", "other", "x" * 2000]))
    message.ridge_mode = draw(st.sampled_from(["", *RIDGE_MODES, "absolute", "y" * 2000]))
    return message


def allocated_while(function: Callable[[], object]) -> tuple[object, int]:
    """Runs `function`; returns (its result or the ValueError it raised, peak bytes allocated)."""
    tracemalloc.start()
    try:
        try:
            result = function()
        except ValueError as e:
            result = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@SETTINGS
@hypothesis.given(tensor=tensors())
def test_tensor_decodes_as_a_view_or_raises_value_error(tensor: pb.Tensor) -> None:
    data_length = len(tensor.data)
    result, peak = allocated_while(lambda: wire.tensor_to_array(tensor))
    # The data bytes are copied out of the message once, nothing else of that size.
    assert peak < data_length + ALLOCATION_SLACK
    hypothesis.event("rejected" if isinstance(result, ValueError) else "decoded")
    if isinstance(result, ValueError):
        assert str(result)
        return
    assert isinstance(result, np.ndarray)
    assert result.shape == tuple(tensor.shape)
    assert result.dtype in (np.dtype("<f4"), np.dtype("<f8"))
    assert result.nbytes == data_length and not result.flags.writeable


@SETTINGS
@hypothesis.given(message=block_messages())
def test_block_decodes_valid_or_raises_value_error(message: pb.BlockStatistics) -> None:
    data_length = len(message.statistics.data)
    result, peak = allocated_while(
        lambda: validation.decode_block(message, max_matrix_size=MAX_MATRIX_SIZE)
    )
    # One copy of the data, and the symmetry check's few rows (< 2x for a small matrix).
    assert peak < 3 * data_length + ALLOCATION_SLACK
    hypothesis.event("rejected" if isinstance(result, ValueError) else "valid")
    if isinstance(result, ValueError):
        assert str(result) and len(str(result)) < 500
        return
    assert isinstance(result, validation.ValidBlock)
    n = result.matrix.shape[0]
    assert result.matrix.shape == (n, n) and 1 <= n <= MAX_MATRIX_SIZE
    assert result.key and len(result.key) <= validation.MAX_KEY_LENGTH
    assert result.step >= 0 and result.exponent >= 1
    settings = result.settings
    assert settings.ridge_epsilon is None or 0 < settings.ridge_epsilon < 1
    assert settings.failure_threshold is None or 0 < settings.failure_threshold < math.inf
    assert settings.method in (None, *METHODS)
    assert settings.ridge_mode in (None, *RIDGE_MODES)
    assert np.isfinite(result.matrix).all()
    scale = np.abs(result.matrix).max()
    asymmetry = np.abs(result.matrix - result.matrix.T).max()
    assert asymmetry <= validation.SYMMETRY_TOLERANCE * scale


@SETTINGS
@hypothesis.given(data=st.binary(max_size=2048))
@pytest.mark.parametrize(
    "message_type",
    [pb.PushStatisticsRequest, pb.GetPreconditionersRequest, pb.DropRunRequest, pb.BlockStatistics],
)
def test_arbitrary_bytes_parse_or_raise_value_error(message_type: type, data: bytes) -> None:
    try:
        parsed = wire.parse_request(message_type, data, max_entries=8)
    except ValueError as e:
        assert str(e)
        return
    assert isinstance(parsed, message_type)


@SETTINGS
@hypothesis.given(
    blocks=st.lists(block_messages(), max_size=6),
    run_id=st.text(max_size=10),
    cut=st.integers(0, 64),
)
def test_encoded_pushes_and_their_truncations_parse_or_raise_value_error(
    blocks: list[pb.BlockStatistics], run_id: str, cut: int
) -> None:
    data = pb.PushStatisticsRequest(run_id=run_id, blocks=blocks).SerializeToString()
    # Room for 6 blocks of 100 elements (shapes of up to 80 dimensions).
    assert wire.parse_request(pb.PushStatisticsRequest, data, max_entries=40).blocks == blocks
    if data:  # 100 copies merge into one message of 100 times the fields: too many for 1.
        with pytest.raises(wire.RequestTooLargeError):
            wire.parse_request(pb.PushStatisticsRequest, data * 100, max_entries=1)
    truncated = data[: max(0, len(data) - cut)]
    try:
        parsed = wire.parse_request(pb.PushStatisticsRequest, truncated, max_entries=40)
    except ValueError:
        return
    assert isinstance(parsed, pb.PushStatisticsRequest)


def test_shape_of_two_billion_squared_is_rejected_before_allocating() -> None:
    tensor = pb.Tensor(shape=[2**31, 2**31], dtype=pb.FLOAT64, data=b"\0" * 64)
    message = pb.BlockStatistics(key="k", step=1, exponent=2, statistics=tensor)
    for decode in (
        lambda: wire.tensor_to_array(tensor),
        lambda: validation.decode_block(message, max_matrix_size=2**40),
    ):
        result, peak = allocated_while(decode)
        assert isinstance(result, ValueError) and "bytes" in str(result)
        assert peak < ALLOCATION_SLACK
