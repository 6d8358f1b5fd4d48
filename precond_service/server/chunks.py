"""Reassembles the statistics a push stream sends in chunks, in buffers charged to the budget.

A statistic larger than a message arrives as consecutive BlockStatistics of one key
and step (see `data_offset` in the .proto). At its first chunk the whole matrix is
reserved in the byte budget and allocated, so what a stream can make the service
hold is known before its bytes arrive; each chunk is copied into place as it comes,
and the statistic is handed on once its last byte is in. The reservation then goes
with the matrix to the scheduler (`Scheduler.submit(..., paid_bytes=...)`). A stream
assembles one statistic at a time, so beyond the budget it holds one message.
"""

from __future__ import annotations

import dataclasses
import mmap

import numpy as np

from precond_service.common import wire
from precond_service.server.budget import ByteBudget
from precond_service.server.service_records import Rejection
from precond_service.server.validation import MAX_KEY_LENGTH
from protos import precond_service_pb2 as pb


@dataclasses.dataclass(frozen=True)
class AssembledBlock:
    """A statistic whose chunks have all arrived.

    Attributes:
        header: Its first chunk's fields (its data is not used).
        matrix: The whole matrix, read-only.
        paid_bytes: Bytes of the budget reserved for `matrix`, now the receiver's to
            release or hand on.
    """

    header: pb.BlockStatistics
    matrix: np.ndarray
    paid_bytes: int


class ChunkAssembler:
    """The statistic one push stream is sending in chunks (used by one task at a time)."""

    def __init__(self, budget: ByteBudget, *, max_matrix_size: int) -> None:
        """Creates an assembler with nothing in progress.

        Args:
            budget: Reserved for each matrix at its first chunk.
            max_matrix_size: Largest matrix side n accepted.
        """
        self._budget = budget
        self._max_matrix_size = max_matrix_size
        self._header: pb.BlockStatistics | None = None
        self._buffer: np.ndarray | None = None
        self._filled = 0
        # (key, step) of a statistic refused at its first chunk: its other chunks are skipped.
        self._skipping: tuple[str, int] | None = None

    def add(
        self, block: pb.BlockStatistics
    ) -> list[pb.BlockStatistics | AssembledBlock | Rejection]:
        """Takes one received block or chunk.

        Returns:
            What is complete now, in order: a whole block as received, an assembled
            statistic, or the rejection of a statistic left unfinished.

        Raises:
            BudgetExceededError: If a statistic's first chunk does not fit in the budget.
        """
        out: list[pb.BlockStatistics | AssembledBlock | Rejection] = []
        ident = (block.key, block.step)
        if self._header is not None:
            if ident == (self._header.key, self._header.step) and block.data_offset:
                return self._continue(block)
            out.append(self.abandon(f"the chunk at byte {self._filled} did not follow"))
        if block.data_offset:
            if ident != self._skipping:
                out.append(
                    self._rejection(
                        block,
                        f"a chunk at byte {block.data_offset} without the chunks before it; "
                        "send a statistic's chunks in order, one after the other",
                    )
                )
            return out
        self._skipping = None
        try:
            nbytes = self._whole_bytes(block)
        except ValueError:
            nbytes = None
        if nbytes is None or len(block.statistics.data) >= nbytes:
            # Whole, or not a matrix at all: `validation.decode_block` says what is wrong.
            self._skipping = ident if nbytes is None else None
            return [*out, block]
        self._budget.reserve(nbytes, "this statistic")  # Or BudgetExceededError: the push ends.
        self._header = pb.BlockStatistics()
        self._header.CopyFrom(block)
        self._header.statistics.ClearField("data")
        # Mapped on its own, not taken from malloc: its pages go back to the system
        # as soon as it is freed, wherever malloc's heaps stand.
        self._buffer = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)
        self._filled = 0
        return out + self._continue(block)

    def abandon(self, why: str) -> Rejection:
        """Gives up the statistic in progress (there must be one); returns its rejection."""
        header, total = self._header, len(self._buffer)
        self._budget.release(total)
        self._header, self._buffer = None, None
        self._skipping = (header.key, header.step)
        return self._rejection(
            header,
            f"tensor data has {self._filled} bytes, but shape {list(header.statistics.shape)} "
            f"needs {total} ({why}); send the chunks of a statistic in order, one after "
            "the other, in one push",
        )

    def close(self) -> list[Rejection]:
        """Ends the stream: rejects the statistic in progress, if any."""
        if self._header is None:
            return []
        return [self.abandon("the push ended")]

    def _continue(
        self, block: pb.BlockStatistics
    ) -> list[pb.BlockStatistics | AssembledBlock | Rejection]:
        """Copies a chunk of the statistic in progress into place."""
        if block.data_offset != self._filled:
            return [self.abandon(f"the next chunk started at byte {block.data_offset}")]
        data = block.statistics.data  # Each access copies: once only.
        if len(data) > len(self._buffer) - self._filled:
            return [self.abandon("a chunk runs past the matrix's end")]
        self._buffer[self._filled : self._filled + len(data)] = np.frombuffer(data, np.uint8)
        self._filled += len(data)
        if self._filled < len(self._buffer):
            return []
        header, buffer = self._header, self._buffer
        self._header, self._buffer = None, None
        n = header.statistics.shape[0]
        matrix = buffer.view(wire.tensor_dtype(header.statistics)).reshape(n, n)
        matrix.flags.writeable = False
        return [AssembledBlock(header, matrix, len(buffer))]

    def _whole_bytes(self, block: pb.BlockStatistics) -> int:
        """Bytes of the whole matrix the block's first chunk announces.

        Raises:
            ValueError: If it is not a square matrix of a known dtype within
                max_matrix_size (`validation.decode_block` gives the reason).
        """
        shape = block.statistics.shape
        if len(shape) != 2 or shape[0] != shape[1] or not 1 <= shape[0] <= self._max_matrix_size:
            raise ValueError("not a matrix the service accepts")
        return wire.tensor_nbytes(block.statistics)

    @staticmethod
    def _rejection(block: pb.BlockStatistics, reason: str) -> Rejection:
        return Rejection(block.key[:MAX_KEY_LENGTH], block.step, reason)
