# Over 400 lines for a reason: end-to-end tests sharing one service fixture and helpers.
"""End-to-end tests of the service: real server on a loopback port, real worker processes.

(Over 400 lines: every RPC of the contract against one real server; the units behind it
are in test_service_units.py, hostile input in test_service_hostile.py.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from precond_service.client.service_client import PreconditionerClient
from precond_service.common import wire
from precond_service.common.auth import run_digest
from precond_service.common.blocks import StatisticsBlock
from precond_service.common.events import Event, EventLog, read_events
from precond_service.common.roots import batched_inverse_pth_root
from precond_service.server.pool import FAILURES_BEFORE_NOT_SERVING
from precond_service.server.server import serve
from precond_service.server.service_records import ServiceConfig
from precond_service.status import main as status_main
from protos import precond_service_pb2 as pb
from tests.conftest import eigh_inverse_root, random_statistic, wait_until

RIDGE = 1e-6


def push(
    stub, run_id: str, *blocks: StatisticsBlock | pb.BlockStatistics
) -> pb.PushStatisticsReply:
    """Pushes blocks in one PushStatistics RPC: one message, or chunked as clients do."""
    if all(isinstance(b, StatisticsBlock) for b in blocks):
        chunked = wire.push_messages(run_id, blocks)
        requests = [pb.PushStatisticsRequest.FromString(b"".join(m)) for m in chunked]
        return stub.PushStatistics(iter(requests))
    messages = [
        b if isinstance(b, pb.BlockStatistics) else wire.statistics_to_message(b) for b in blocks
    ]
    return stub.PushStatistics(iter([pb.PushStatisticsRequest(run_id=run_id, blocks=messages)]))


def pull(stub, run_id: str, known: dict[str, int] | None = None) -> dict[str, pb.Preconditioner]:
    """Returns the published roots newer than `known`, by key."""
    request = pb.GetPreconditionersRequest(run_id=run_id, known_steps=known or {})
    return {p.key: p for reply in stub.GetPreconditioners(request) for p in reply.roots}


def pull_until(stub, run_id: str, steps: dict[str, int], timeout_s: float = 60) -> dict:
    """Pulls until every key has a root of at least the given step."""
    roots: dict[str, pb.Preconditioner] = {}

    def done() -> bool:
        roots.update(pull(stub, run_id))
        return all(k in roots and roots[k].stats_step >= s for k, s in steps.items())

    assert wait_until(done, timeout_s), f"not published in {timeout_s} s: {steps}, got {roots}"
    return roots


def assert_close_root(root: np.ndarray, expected: np.ndarray, tolerance: float = 1e-5) -> None:
    """Asserts a root matches the reference to a relative Frobenius distance."""
    relative = np.linalg.norm(root - expected) / np.linalg.norm(expected)
    assert relative < tolerance, relative


def status(stub, run_id: str = "") -> pb.ServiceStatus:
    return stub.GetStatus(pb.StatusRequest(run_id=run_id))


def run_status(stub, run_id: str) -> pb.RunStatus:
    (run,) = status(stub, run_id).runs
    return run


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=5
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def worker_held_busy(stub, run_id: str, n: int = 768) -> Iterator[int]:
    """Stops the (single, ready) worker (SIGSTOP), then gives it a job, until the block ends.

    Stopped before the job is sent, so that however fast the machine the job is in
    flight for as long as the block lasts. Yields the worker's pid.
    """
    (pid,) = status(stub).worker_pids
    os.kill(pid, signal.SIGSTOP)
    try:
        push(stub, run_id, StatisticsBlock("blocker", 1, 4, random_statistic(n, seed=99)))
        assert wait_until(lambda: status(stub).in_flight == 1, 10)
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_roots_of_several_blocks_and_runs_match_eigh(start_service, stub_for) -> None:
    server = start_service(workers=2)
    stub = stub_for(server.address)
    cases = {  # key -> (n, exponent, dtype)
        "small|d0": (8, 2, np.float64),
        "mid|d1": (32, 4, np.float32),
        "big|d0": (100, 8, np.float64),
        "big|d1": (100, 4, np.float32),
    }
    statistics = {}
    for run_index, run_id in enumerate(("run-a", "run-b")):
        blocks = []
        for key_index, (key, (n, p, dtype)) in enumerate(cases.items()):
            matrix = random_statistic(n, seed=10 * run_index + key_index, dtype=dtype)
            statistics[run_id, key] = (matrix, p)
            blocks.append(StatisticsBlock(key, 7, p, matrix))
        reply = push(stub, run_id, *blocks)
        assert reply.accepted == len(cases) and not reply.rejected
        assert reply.incarnation == server.service.incarnation

    for run_id in ("run-a", "run-b"):
        roots = pull_until(stub, run_id, dict.fromkeys(cases, 7))
        assert sorted(roots) == sorted(cases)
        for key, message in roots.items():
            matrix, p = statistics[run_id, key]
            root = wire.tensor_to_array(message.root)
            expected = eigh_inverse_root(matrix, p, RIDGE)
            assert root.dtype == np.float64 and root.shape == expected.shape
            assert_close_root(root, expected)
            assert message.method == "schur_newton"
            assert message.iterations > 0 and message.error < 1e-3
            assert message.compute_seconds > 0 and message.published_unix_time > 0
    assert not pull(stub, "run-a", {key: 7 for key in cases})
    overall = status(stub)
    assert (overall.published, overall.failed, overall.workers_alive) == (8, 0, 2)
    assert [r.run_digest for r in overall.runs] == sorted(map(run_digest, ["run-a", "run-b"]))
    assert all(r.blocks_published == 4 and r.max_staleness_steps == 0 for r in overall.runs)


def test_every_pull_carries_the_incarnation_in_its_replies(start_service, stub_for) -> None:
    server = start_service(workers=1)
    stub = stub_for(server.address)
    request = pb.GetPreconditionersRequest(run_id="nothing-yet")
    (reply,) = stub.GetPreconditioners(request)  # Exactly one, with no roots.
    assert reply.incarnation == server.service.incarnation and not reply.roots
    keys = [f"k{i}" for i in range(3)]
    push(
        stub,
        "run",
        *(StatisticsBlock(k, 1, 2, random_statistic(600, i)) for i, k in enumerate(keys)),
    )
    pull_until(stub, "run", dict.fromkeys(keys, 1))
    # 2.9 MB roots: at most one per reply beside another (PUSH_BATCH_BYTES is 4 MiB).
    replies = list(stub.GetPreconditioners(pb.GetPreconditionersRequest(run_id="run")))
    assert [r.key for reply in replies for r in reply.roots] == sorted(keys)
    assert len(replies) == 3 and {r.incarnation for r in replies} == {server.service.incarnation}


def test_each_statistic_is_rooted_with_its_own_settings(start_service, stub_for) -> None:
    server = start_service(workers=1)  # Service defaults: ridge 1e-6, threshold 0.1.
    stub = stub_for(server.address)
    matrix = random_statistic(24, seed=5)
    own = StatisticsBlock("own", 3, 4, matrix, ridge_epsilon=1e-3, failure_threshold=0.5)
    default = StatisticsBlock("default", 3, 4, matrix)
    assert push(stub, "run", own, default).accepted == 2
    roots = pull_until(stub, "run", {"own": 3, "default": 3})

    def expected(**settings: float) -> np.ndarray:
        return batched_inverse_pth_root(matrix[None], 4, **settings).roots[0]

    own_root = wire.tensor_to_array(roots["own"].root)
    default_root = wire.tensor_to_array(roots["default"].root)
    np.testing.assert_allclose(
        own_root, expected(ridge_epsilon=1e-3, failure_threshold=0.5), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        default_root, expected(ridge_epsilon=RIDGE, failure_threshold=0.1), rtol=1e-12, atol=1e-12
    )
    assert np.linalg.norm(own_root - default_root) > 1e-3 * np.linalg.norm(default_root)
    assert (roots["own"].ridge_epsilon, roots["default"].ridge_epsilon) == (1e-3, RIDGE)


def test_only_newest_of_rapid_pushes_is_computed(start_service, stub_for) -> None:
    server = start_service(workers=1)
    stub = stub_for(server.address)
    with worker_held_busy(stub, "run"):
        for step in range(1, 11):
            reply = push(stub, "run", StatisticsBlock("k", step, 2, random_statistic(16, step)))
            assert reply.accepted == 1, reply
        assert run_status(stub, "run").pending == 1
    roots = pull_until(stub, "run", {"blocker": 1, "k": 10})
    assert_close_root(
        wire.tensor_to_array(roots["k"].root), eigh_inverse_root(random_statistic(16, 10), 2, RIDGE)
    )
    run = run_status(stub, "run")
    assert (run.accepted, run.coalesced, run.published, run.failed) == (11, 9, 2, 0)


def test_stale_steps_are_rejected_and_repeats_accepted(start_service, stub_for) -> None:
    server = start_service(workers=1)
    stub = stub_for(server.address)
    matrix = random_statistic(8, seed=1)
    push(stub, "run", StatisticsBlock("k", 5, 2, matrix))
    pull_until(stub, "run", {"k": 5})

    reply = push(stub, "run", StatisticsBlock("k", 3, 2, matrix))
    assert reply.accepted == 0
    assert [(e.key, e.step) for e in reply.rejected] == [("k", 3)]
    assert "stale" in reply.rejected[0].reason and "published" in reply.rejected[0].reason

    assert push(stub, "run", StatisticsBlock("k", 5, 2, matrix)).accepted == 1  # A repeat.
    assert push(stub, "run", StatisticsBlock("k", 9, 2, matrix)).accepted == 1
    reply = push(stub, "run", StatisticsBlock("k", 8, 2, matrix))
    assert reply.accepted == 0 and "stale" in reply.rejected[0].reason
    pull_until(stub, "run", {"k": 9})
    run = run_status(stub, "run")
    assert (run.published, run.rejected) == (2, 2)


BAD_BLOCKS = [
    (
        pb.BlockStatistics(key="", step=1, exponent=2, statistics=wire.array_to_tensor(np.eye(2))),
        "empty key",
    ),
    (
        pb.BlockStatistics(key="b", step=1, exponent=0, statistics=wire.array_to_tensor(np.eye(2))),
        "exponent",
    ),
    (
        pb.BlockStatistics(
            key="b", step=-4, exponent=2, statistics=wire.array_to_tensor(np.eye(2))
        ),
        "step",
    ),
    (
        pb.BlockStatistics(
            key="b",
            step=1,
            exponent=2,
            statistics=pb.Tensor(shape=[2, 2], dtype=9, data=b"\0" * 32),
        ),
        "dtype",
    ),
    (
        pb.BlockStatistics(
            key="b", step=1, exponent=2, statistics=pb.Tensor(shape=[2, 2], data=b"\0" * 32)
        ),
        "dtype",
    ),
    (
        pb.BlockStatistics(
            key="b", step=1, exponent=2, statistics=wire.array_to_tensor(np.ones((2, 3)))
        ),
        "square",
    ),
    (
        pb.BlockStatistics(
            key="b", step=1, exponent=2, statistics=wire.array_to_tensor(np.ones((2, 2, 2)))
        ),
        "square",
    ),
    (
        pb.BlockStatistics(
            key="b",
            step=1,
            exponent=2,
            statistics=pb.Tensor(shape=[3, 3], dtype=pb.FLOAT32, data=b"\0" * 35),
        ),
        "bytes",
    ),
    (
        pb.BlockStatistics(
            key="b",
            step=1,
            exponent=2,
            statistics=pb.Tensor(shape=[1 << 40, 1 << 40], dtype=pb.FLOAT32),
        ),
        "max_matrix_size",
    ),
    (
        pb.BlockStatistics(
            key="b", step=1, exponent=2, statistics=wire.array_to_tensor(np.diag([1.0, np.nan]))
        ),
        "NaN",
    ),
    (
        pb.BlockStatistics(
            key="b", step=1, exponent=2, statistics=wire.array_to_tensor(np.diag([np.inf, 1.0]))
        ),
        "infinity",
    ),
    (
        pb.BlockStatistics(
            key="b", step=1, exponent=2, statistics=wire.array_to_tensor(np.eye(65))
        ),
        "max_matrix_size",
    ),
    (
        pb.BlockStatistics(
            key="b",
            step=1,
            exponent=2,
            statistics=wire.array_to_tensor(np.array([[1.0, 2.0], [0.0, 1.0]])),
        ),
        "symmetric",
    ),
    (pb.BlockStatistics(key="b", step=1, exponent=2), "no statistics"),
    *(
        (
            pb.BlockStatistics(
                key="b", step=1, exponent=2, statistics=wire.array_to_tensor(np.eye(2)), **bad
            ),
            reason,
        )
        for bad, reason in [
            ({"ridge_epsilon": 0.0}, "ridge_epsilon must be in (0, 1), got 0.0"),
            ({"ridge_epsilon": 1.0}, "ridge_epsilon must be in (0, 1), got 1.0"),
            ({"ridge_epsilon": float("nan")}, "ridge_epsilon must be in (0, 1), got nan"),
            ({"failure_threshold": 0.0}, "failure_threshold must be finite and > 0, got 0.0"),
            ({"failure_threshold": float("inf")}, "failure_threshold must be finite and > 0"),
            ({"method": "magic"}, "method must be one of ('schur_newton', 'eigh')"),
            ({"ridge_mode": "always"}, "ridge_mode must be one of ('relative', 'absolute_if"),
        ]
    ),
]


def test_bad_inputs_are_rejected_and_the_service_goes_on(start_service, stub_for) -> None:
    server = start_service(workers=1, max_matrix_size=64)
    stub = stub_for(server.address)
    for index, (bad, reason) in enumerate(BAD_BLOCKS):
        good = StatisticsBlock(f"good{index}", 1, 2, random_statistic(4, index))
        reply = push(stub, "bad-run", bad, good)
        assert reply.accepted == 1, (reason, reply)
        assert len(reply.rejected) == 1 and reason in reply.rejected[0].reason, (reason, reply)

    reply = push(stub, "", StatisticsBlock("k", 1, 2, np.eye(2)))
    assert reply.accepted == 0 and "run_id" in reply.rejected[0].reason

    # Bytes that are not a message, and a message above the size limit, fail the RPC only.
    channel = grpc.insecure_channel(server.address)
    raw = channel.stream_unary("/precond.v1.PreconditionerService/PushStatistics")
    with pytest.raises(grpc.RpcError) as garbage:
        raw(iter([b"\xff\xff\xff\xff not a protobuf"]), timeout=10)
    assert garbage.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid precond.v1.PushStatisticsRequest" in garbage.value.details()
    too_big = pb.BlockStatistics(
        key="huge",
        step=1,
        exponent=2,
        statistics=pb.Tensor(shape=[1024, 1024], dtype=pb.FLOAT64, data=bytes(8 << 20)),
    )
    with pytest.raises(grpc.RpcError) as oversized:
        push(stub, "bad-run", too_big)
    assert oversized.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as empty_drop:
        stub.DropRun(pb.DropRunRequest())
    assert empty_drop.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    channel.close()

    assert serving(server.address)
    matrix = random_statistic(16, seed=3)
    assert push(stub, "other-run", StatisticsBlock("k", 1, 4, matrix)).accepted == 1
    roots = pull_until(stub, "other-run", {"k": 1})
    assert_close_root(wire.tensor_to_array(roots["k"].root), eigh_inverse_root(matrix, 4, RIDGE))
    pull_until(stub, "bad-run", {f"good{i}": 1 for i in range(len(BAD_BLOCKS))})
    overall = status(stub)
    assert overall.rejected == len(BAD_BLOCKS) + 1 and overall.failed == 0
    assert overall.workers_alive == 1 and overall.worker_restarts == 0


def test_failed_root_is_not_published_and_previous_stays(start_service, stub_for) -> None:
    # eigh's residual is ~1e-15 for a well-conditioned matrix, ~1e-4 at condition 1e12.
    server = start_service(workers=1, method="eigh", failure_threshold=1e-9, ridge_epsilon=1e-12)
    stub = stub_for(server.address)
    push(stub, "run", StatisticsBlock("k", 1, 4, 2.0 * np.eye(16)))
    first = pull_until(stub, "run", {"k": 1})["k"]
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))
    ill_conditioned = (q * np.logspace(0, -12, 16)) @ q.T
    push(stub, "run", StatisticsBlock("k", 2, 4, (ill_conditioned + ill_conditioned.T) / 2))
    assert wait_until(lambda: run_status(stub, "run").failed == 1, 30)
    roots = pull(stub, "run")
    assert roots["k"].stats_step == 1 and roots["k"].root.data == first.root.data
    assert run_status(stub, "run").published == 1


def test_crashed_worker_is_replaced_and_its_job_failed(start_service, stub_for) -> None:
    server = start_service(workers=1)
    stub = stub_for(server.address)
    with worker_held_busy(stub, "run") as pid:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        now = status(stub)
        return now.failed == 1 and now.workers_alive == 1 and list(now.worker_pids) != [pid]

    assert wait_until(replaced, 30)
    assert status(stub).worker_restarts == 1
    assert "blocker" not in pull(stub, "run")
    push(stub, "run", StatisticsBlock("k", 1, 2, random_statistic(8, 0)))
    pull_until(stub, "run", {"k": 1})


def test_job_past_timeout_is_failed_and_worker_replaced(start_service, stub_for) -> None:
    server = start_service(workers=1, job_timeout_s=0.3)
    stub = stub_for(server.address)
    # The worker is stopped before it gets the job, so the job runs past the timeout
    # however fast the machine (a 768 x 768 root alone took under 0.3 s on a quiet one).
    (pid,) = status(stub).worker_pids
    os.kill(pid, signal.SIGSTOP)
    try:
        push(stub, "run", StatisticsBlock("slow", 1, 4, random_statistic(64, 5)))
        assert wait_until(lambda: status(stub).failed == 1, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert wait_until(
        lambda: status(stub).workers_alive == 1 and list(status(stub).worker_pids) != [pid], 30
    )
    push(stub, "run", StatisticsBlock("k", 1, 2, random_statistic(8, 0)))
    pull_until(stub, "run", {"k": 1})
    assert status(stub).worker_restarts == 1


def test_pull_returns_at_once_while_workers_are_busy(start_service, stub_for) -> None:
    server = start_service(workers=1)
    stub = stub_for(server.address)
    with worker_held_busy(stub, "run"):
        # The pull answers while the computation is still going on.
        assert pull(stub, "run") == {}
        assert status(stub).in_flight == 1


def test_drop_run_releases_everything(start_service, stub_for) -> None:
    server = start_service(workers=1)
    stub = stub_for(server.address)
    push(stub, "run", *(StatisticsBlock(f"k{i}", 1, 2, np.eye(4)) for i in range(3)))
    push(stub, "keep", StatisticsBlock("k", 1, 2, np.eye(4)))
    pull_until(stub, "run", {"k0": 1, "k1": 1, "k2": 1})
    reply = stub.DropRun(pb.DropRunRequest(run_id="run"))
    assert reply.dropped and reply.blocks_released == 3
    assert pull(stub, "run") == {}
    assert [r.run_digest for r in status(stub).runs] == [run_digest("keep")]
    assert not stub.DropRun(pb.DropRunRequest(run_id="run")).dropped
    push(stub, "run", StatisticsBlock("k0", 1, 2, np.eye(4)))  # Step 1 is new again.
    pull_until(stub, "run", {"k0": 1})


def test_token_is_required_except_for_health(start_service, stub_for) -> None:
    server = start_service(workers=1, token="s3cret")
    stub = stub_for(server.address)
    for call in (lambda: status(stub), lambda: pull(stub, "run")):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        push(stub, "run", StatisticsBlock("k", 1, 2, np.eye(2)))
    assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert serving(server.address)

    with PreconditionerClient(
        server.address, "run", token="s3cret", pull_interval_s=0.02
    ) as client:
        client.push([StatisticsBlock("k", 1, 2, np.eye(2))])
        assert wait_until(lambda: "k" in client.latest(), 30)
    with PreconditionerClient(server.address, "run", token="wrong", pull_interval_s=0.02) as client:
        client.push([StatisticsBlock("k", 2, 2, np.eye(2))])
        assert wait_until(lambda: client.status().permanent_error is not None, 30)
        assert "UNAUTHENTICATED" in client.status().last_error


def test_graceful_shutdown_finishes_inflight_rpcs(start_service) -> None:
    server = start_service(workers=1)
    channel = grpc.insecure_channel(server.address)
    health_updates = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME)
    )
    assert next(health_updates).status == health_pb2.HealthCheckResponse.SERVING

    release = threading.Event()

    def slow_stream():
        block = wire.statistics_to_message(StatisticsBlock("k", 1, 2, np.eye(4)))
        yield pb.PushStatisticsRequest(run_id="run", blocks=[block])
        release.wait(10)
        block = wire.statistics_to_message(StatisticsBlock("k2", 1, 2, np.eye(4)))
        yield pb.PushStatisticsRequest(run_id="run", blocks=[block])

    from protos import precond_service_pb2_grpc as pb_grpc

    future = pb_grpc.PreconditionerServiceStub(channel).PushStatistics.future(slow_stream())
    assert wait_until(lambda: server.service.status().received == 1, 10)
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 10})
    stopper.start()
    assert next(health_updates).status == health_pb2.HealthCheckResponse.NOT_SERVING
    health_updates.cancel()  # Open watches would hold the server for the whole grace.
    release.set()
    assert future.result(timeout=10).accepted == 2
    stopper.join(15)
    assert not stopper.is_alive()
    assert server.service.status().workers_alive == 0
    channel.close()


def test_subtly_asymmetric_statistic_is_never_published(start_service, stub_for) -> None:
    # The receive path samples rows for symmetry; the worker checks every entry.
    server = start_service(workers=1)
    stub = stub_for(server.address)
    matrix = random_statistic(200, seed=1)
    matrix[3, 150] += 1.0
    reply = push(stub, "run", StatisticsBlock("k", 1, 2, matrix))
    if reply.accepted:
        assert wait_until(lambda: run_status(stub, "run").failed == 1, 30)
    else:
        assert "symmetric" in reply.rejected[0].reason
    assert pull(stub, "run") == {}
    reply = push(stub, "run", StatisticsBlock("x", 1, 2, np.triu(random_statistic(200, seed=2))))
    assert reply.accepted == 0 and "symmetric" in reply.rejected[0].reason


def test_a_run_is_readable_only_with_its_run_id_and_status_hides_run_ids(
    start_service, stub_for, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="precond_service")
    server = start_service(workers=1)
    stub = stub_for(server.address)
    matrices = {
        f"run-{name}-{uuid.uuid4().hex}": random_statistic(8, i) for i, name in enumerate("ab")
    }
    run_a, run_b = matrices
    for run_id, matrix in matrices.items():
        push(stub, run_id, StatisticsBlock("shared/key", 1, 2, matrix))
    for run_id, matrix in matrices.items():
        roots = pull_until(stub, run_id, {"shared/key": 1})
        assert list(roots) == ["shared/key"]
        expected = eigh_inverse_root(matrix, 2, RIDGE)
        assert_close_root(wire.tensor_to_array(roots["shared/key"].root), expected)
    for wrong in (run_a[:-1], run_a + "x", run_a.upper(), run_digest(run_a), "run-a"):
        assert pull(stub, wrong) == {}, wrong

    assert push(stub, run_a, StatisticsBlock("bad", 1, 0, np.eye(2))).rejected  # Logged.
    digests = sorted(map(run_digest, matrices))
    overall = status(stub)
    assert [r.run_digest for r in overall.runs] == digests
    assert [r.run_digest for r in status(stub, run_b).runs] == [run_digest(run_b)]
    outputs = [overall.SerializeToString().decode("utf-8", "replace")]
    assert status_main([f"--address={server.address}"]) == 0
    outputs.append(capsys.readouterr().out)
    assert status_main([f"--address={server.address}", "--json"]) == 0
    outputs.append(capsys.readouterr().out)
    assert status_main([f"--address={server.address}", f"--run_id={run_a}"]) == 0
    outputs.append(capsys.readouterr().out)
    assert stub.DropRun(pb.DropRunRequest(run_id=run_b)).dropped
    outputs.append(caplog.text)
    for output in outputs:
        assert all(run_id not in output for run_id in matrices), output
    assert all(d in outputs[1] and d in outputs[2] for d in digests)
    assert run_digest(run_a) in outputs[3] and run_digest(run_b) not in outputs[3]
    assert run_digest(run_a) in caplog.text and run_digest(run_b) in caplog.text


def test_a_failing_dispatcher_reports_not_serving_until_it_works(tmp_path, stub_for) -> None:
    events_path = tmp_path / "events.jsonl"
    with EventLog(events_path) as events:
        server = serve(ServiceConfig(workers=1), events=events)
        try:
            pool = server.service._pool
            take, failing = pool._take_job, threading.Event()

            def take_unless_failing():  # Fault injection: the scheduler's take raises.
                if failing.is_set():
                    raise RuntimeError("injected take failure")
                return take()

            failing.set()
            pool._take_job = take_unless_failing
            stub = stub_for(server.address)
            assert push(stub, "run", StatisticsBlock("k", 1, 2, np.eye(3))).accepted == 1
            assert wait_until(lambda: not serving(server.address), 30)
            (failing_event,) = read_events(events_path, Event.DISPATCHER_FAILING)
            assert failing_event["failures_in_a_row"] == FAILURES_BEFORE_NOT_SERVING
            assert "injected take failure" in failing_event["error"]

            failing.clear()
            assert wait_until(lambda: serving(server.address), 30)
            pull_until(stub, "run", {"k": 1})  # The job was not lost.
        finally:
            server.stop(grace_s=0.5)
    assert [e["event"] for e in read_events(events_path)] == [
        Event.SERVICE_STARTED,
        Event.DISPATCHER_FAILING,
        Event.SERVICE_STOPPED,
    ]
