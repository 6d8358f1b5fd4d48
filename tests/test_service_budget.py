"""The byte budget (`--memory_budget_mb`): what clients can make the service hold (issue 14).

Units check the accounting of the scheduler and the store; a real server on loopback
checks that pushes beyond the budget are refused with RESOURCE_EXHAUSTED naming the
flag, and that DropRun gives every byte back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from precond_service.client.service_client import PreconditionerClient
from precond_service.common import wire
from precond_service.common.blocks import StatisticsBlock
from precond_service.server.budget import BudgetExceededError, ByteBudget
from precond_service.server.chunks import ChunkAssembler
from precond_service.server.scheduler import Job, Scheduler
from precond_service.server.store import PublishedRoot, VersionedStore
from protos import precond_service_pb2 as pb
from tests.conftest import random_statistic, wait_until
from tests.test_service import pull_until, push, status, worker_held_busy

MIB = 1 << 20


def job(key: str, step: int, n: int) -> Job:
    return Job("run", key, step, 2, np.zeros((n, n)))


def test_budget_refuses_what_does_not_fit_and_names_the_flag() -> None:
    budget = ByteBudget(4 * MIB)
    budget.reserve(3 * MIB, "this push message")
    with pytest.raises(BudgetExceededError, match=r"--memory_budget_mb=4; retry later"):
        budget.reserve(2 * MIB, "this push message")
    assert (budget.held_bytes, budget.refused) == (3 * MIB, 1)
    budget.release(3 * MIB)
    budget.reserve(4 * MIB, "this push message")


def test_the_scheduler_holds_statistics_and_each_keys_root_until_released() -> None:
    budget = ByteBudget(64 * MIB)
    scheduler = Scheduler(max_blocks=10, budget=budget)
    scheduler.submit(job("a", 1, 64))
    scheduler.submit(job("b", 1, 32))
    roots = (64 * 64 + 32 * 32) * 8  # Held from the first statistic of each key on.
    assert budget.held_bytes == (64 * 64 + 32 * 32) * 8 + roots
    scheduler.submit(job("a", 2, 16))  # Replaces the pending 64 x 64; its root room stays.
    assert budget.held_bytes == (16 * 16 + 32 * 32) * 8 + roots
    taken = scheduler.take()
    assert budget.held_bytes == (16 * 16 + 32 * 32) * 8 + roots  # Being computed: still held.
    scheduler.finish(taken, published=True)
    assert taken.key == "b" and budget.held_bytes == 16 * 16 * 8 + roots
    scheduler.drop_run("run")
    assert budget.held_bytes == 0

    store = VersionedStore()  # Publishing takes nothing more: the root's room is held.
    store.publish("run", PublishedRoot("k", 1, np.eye(8), 0.0, 1, "eigh", 0.0, 1e-6, 0.0))
    assert budget.held_bytes == 0


def test_a_statistic_whose_root_does_not_fit_is_refused_naming_the_flag() -> None:
    budget = ByteBudget(MIB + 64)
    scheduler = Scheduler(max_blocks=10, budget=budget)
    scheduler.submit(job("a", 1, 256))  # 512 KiB, and 512 KiB for its root.
    with pytest.raises(BudgetExceededError, match=r"--memory_budget_mb=1"):
        scheduler.submit(job("b", 1, 8))
    assert scheduler.blocks_known() == 1 and budget.held_bytes == MIB
    budget.reserve(64, "a chunked statistic")
    with pytest.raises(BudgetExceededError):  # What was paid for it is released.
        scheduler.submit(job("c", 1, 4), paid_bytes=64)
    assert budget.held_bytes == MIB


def test_chunks_are_reassembled_into_a_buffer_reserved_at_the_first_one() -> None:
    budget = ByteBudget(2 * MIB)
    assembler = ChunkAssembler(budget, max_matrix_size=1024)
    matrix = np.arange(300 * 300, dtype=np.float64).reshape(300, 300)
    blocks = [
        block
        for message in wire.push_messages(
            "run", [StatisticsBlock("k", 3, 2, matrix)], message_bytes=200_000
        )
        for block in pb.PushStatisticsRequest.FromString(b"".join(message)).blocks
    ]
    assert len(blocks) == 4
    assert assembler.add(blocks[0]) == [] and budget.held_bytes == matrix.nbytes
    for block in blocks[1:-1]:
        assert assembler.add(block) == []
    (done,) = assembler.add(blocks[-1])
    assert np.array_equal(done.matrix, matrix) and done.paid_bytes == matrix.nbytes
    assert (done.header.key, done.header.step) == ("k", 3)

    # Chunks out of order, or a stream that ends early: the buffer goes back.
    budget.release(done.paid_bytes)
    assembler.add(blocks[0])
    (rejected,) = assembler.add(blocks[2])
    assert "the next chunk started at byte" in rejected.reason and budget.held_bytes == 0
    assert assembler.add(blocks[3]) == []  # The rest of a refused statistic is skipped.
    assembler.add(blocks[0])
    (ended,) = assembler.close()
    assert "the push ended" in ended.reason and budget.held_bytes == 0

    # A statistic that does not fit is refused at its first chunk, naming the flag.
    budget.reserve(2 * MIB - 1000, "others")
    with pytest.raises(BudgetExceededError, match="--memory_budget_mb=2"):
        assembler.add(blocks[0])
    assert budget.held_bytes == 2 * MIB - 1000


def test_pushes_beyond_the_budget_are_refused_and_drop_run_gives_it_back(
    start_service, stub_for
) -> None:
    server = start_service(workers=1, memory_budget_mb=32)
    stub = stub_for(server.address)
    held = 768 * 768 * 8 * 2  # A statistic being computed, and room for its root.
    with worker_held_busy(stub, "run", n=768):
        replies, errors = [], []
        for i in range(8):  # 2 MiB each, and 2 MiB for each root; pending while held.
            try:
                replies.append(push(stub, "run", StatisticsBlock(f"k{i}", 1, 2, np.eye(512))))
            except grpc.RpcError as e:
                errors.append(e)
        # The fifth does not fit beside its 4 MiB of message and the 25 MiB held.
        assert [reply.accepted for reply in replies] == [1] * 4
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert len(errors) == 4 and "--memory_budget_mb=32" in errors[0].details()
        now = status(stub)
        assert now.memory_held_bytes == held + 4 * 512 * 512 * 8 * 2
        assert now.memory_held_bytes <= now.memory_budget_bytes == 32 * MIB
        assert now.memory_refused == 4
    pull_until(stub, "run", {f"k{i}": 1 for i in range(4)})
    assert status(stub).memory_held_bytes == (768 * 768 + 4 * 512 * 512) * 8  # Roots now.
    stub.DropRun(pb.DropRunRequest(run_id="run"), timeout=30)
    assert status(stub).memory_held_bytes == 0
    push(stub, "run", StatisticsBlock("k", 1, 2, random_statistic(512, 0)))
    assert wait_until(lambda: status(stub).published == 6, 60)


def test_a_client_refused_for_the_budget_retries_and_gets_its_roots_once_room_is_made(
    start_service, stub_for
) -> None:
    server = start_service(workers=1, memory_budget_mb=16)
    stub = stub_for(server.address)
    for i in range(3):  # 6 MiB of another run's roots held (one at a time: 4 MiB each
        # while pending, the statistic and its root's room).
        push(stub, "other", StatisticsBlock(f"o{i}", 1, 2, random_statistic(512, i)))
        pull_until(stub, "other", {f"o{j}": 1 for j in range(i + 1)})
    blocks = [StatisticsBlock(f"k{i}", 1, 2, random_statistic(512, 10 + i)) for i in range(2)]
    with PreconditionerClient(
        server.address, "run", pull_interval_s=0.05, backoff_max_s=0.2
    ) as client:
        # Its stream declares a 4 MiB message and holds 8 MiB for it: with the 6 held,
        # 2 are left, not the 4 of a statistic and its root.
        client.push(blocks)
        assert wait_until(lambda: client.status().push_failures >= 2, 30)
        assert "RESOURCE_EXHAUSTED" in client.status().last_error
        assert client.latest() == {} and client.status().blocks_rejected == 0
        stub.DropRun(pb.DropRunRequest(run_id="other"), timeout=30)
        assert wait_until(lambda: set(client.latest()) == {"k0", "k1"}, 60)


def test_a_push_is_admitted_from_its_declared_size_before_it_is_read(
    start_service, stub_for
) -> None:
    server = start_service(workers=1, memory_budget_mb=8)
    stub = stub_for(server.address)
    never_sent = threading.Event()

    def nothing_yet() -> Iterator[pb.PushStatisticsRequest]:
        never_sent.wait(30)  # The refusal must not wait for a message.
        return
        yield

    # Counted as the largest message received, 4 MiB + 64 KiB: 2 x that > 8 MiB.
    declared = ((wire.MESSAGE_BYTES_METADATA, str(8 * MIB)),)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushStatistics(nothing_yet(), metadata=declared, timeout=20)
    finally:
        never_sent.set()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "declared" in refused.value.details()
    assert "--memory_budget_mb=8" in refused.value.details()
    assert status(stub).memory_held_bytes == 0

    message = wire.encode_push_request("run", [StatisticsBlock("k", 1, 2, np.eye(64))])
    channel = grpc.insecure_channel(server.address)
    push_bytes = channel.stream_unary(  # Sends the bytes as they are.
        "/precond.v1.PreconditionerService/PushStatistics",
        response_deserializer=pb.PushStatisticsReply.FromString,
    )
    for value, code, words in (
        (str(len(message) - 1), grpc.StatusCode.INVALID_ARGUMENT, "larger than the"),
        ("lots", grpc.StatusCode.INVALID_ARGUMENT, "non-negative integer"),
    ):
        with pytest.raises(grpc.RpcError) as bad:
            push_bytes(iter([message]), metadata=((wire.MESSAGE_BYTES_METADATA, value),))
        assert bad.value.code() == code and words in bad.value.details(), bad.value.details()
    declared = ((wire.MESSAGE_BYTES_METADATA, str(len(message))),)
    assert push_bytes(iter([message]), metadata=declared).accepted == 1
    channel.close()
    assert wait_until(lambda: status(stub).memory_held_bytes == 64 * 64 * 8, 30)  # Its root.
