"""Tests of the client library against real services, up, down, killed and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from precond_service.client.service_client import (
    PermanentServiceError,
    PreconditionerClient,
    wait_for_serving,
)
from precond_service.common import wire
from precond_service.common.auth import run_digest
from precond_service.common.blocks import StatisticsBlock
from precond_service.status import fetch_status
from protos import precond_service_pb2 as pb
from tests.conftest import (
    eigh_inverse_root,
    free_port,
    random_statistic,
    start_service_process,
    subprocess_env,
    wait_until,
)

FAST = {"pull_interval_s": 0.02, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}


class Trainer(threading.Thread):
    """Stands for the training loop: pushes statistics and reads roots, over and over."""

    def __init__(self, client: PreconditionerClient) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.step = 0
        self.stop = threading.Event()

    def run(self) -> None:
        matrices = {key: random_statistic(16, seed) for seed, key in enumerate("ab")}
        while not self.stop.is_set():
            self.step += 1
            blocks = [StatisticsBlock(key, self.step, 4, m) for key, m in matrices.items()]
            self.client.push(blocks)
            for _ in range(20):
                self.client.latest()
                time.sleep(0.001)


def test_client_recovers_from_down_killed_and_restarted_service(tmp_path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    client = PreconditionerClient(address, "run", **FAST)
    client.start()
    trainer = Trainer(client)
    trainer.start()
    processes = []
    try:
        # Down at start: pushes fail and are kept, nothing arrives, nothing blocks.
        assert wait_until(lambda: client.status().push_failures >= 2, 10)
        assert client.latest() == {} and not client.status().connected

        processes.append(start_service_process(tmp_path / "service.log", port=port)[0])
        assert wait_until(lambda: set(client.latest()) == {"a", "b"}, 30)
        first = client.status()
        assert first.connected and first.incarnation

        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait(10)
        assert wait_until(lambda: not client.status().connected, 10)
        held = client.latest()
        assert set(held) == {"a", "b"}  # What arrived stays usable while it is down.

        processes.append(start_service_process(tmp_path / "service.log", port=port)[0])
        assert wait_until(lambda: client.status().restarts_seen == 1, 30)
        assert client.status().incarnation != first.incarnation
        step_at_restart = trainer.step
        assert wait_until(
            lambda: all(b.stats_step > step_at_restart for b in client.latest().values()), 30
        )
        restarted = fetch_status(address)
        assert restarted.incarnation == client.status().incarnation
        assert restarted.published >= 2 and restarted.failed == 0
    finally:
        trainer.stop.set()
        trainer.join(10)
        client.close()
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(30)


def test_push_and_latest_return_while_an_rpc_hangs(tmp_path) -> None:
    process, address = start_service_process(tmp_path / "service.log")
    client = PreconditionerClient(address, "run", **FAST)
    client.start()
    try:
        client.push([StatisticsBlock("k", 1, 2, np.eye(4))])
        assert wait_until(lambda: "k" in client.latest(), 30)
        # A stopped service answers nothing: the push thread's next RPC hangs.
        os.kill(process.pid, signal.SIGSTOP)
        before = client.status()
        client.push([StatisticsBlock("k", 2, 2, np.eye(4))])
        assert wait_until(lambda: client.status().pending_blocks == 0, 30)  # in flight
        # The training thread's calls do not wait for it: they all return while
        # that RPC is still outstanding (neither sent nor failed).
        for step in range(3, 103):
            client.push([StatisticsBlock("k", step, 2, np.eye(4))])
            held = client.latest()
        after = client.status()
        assert (after.pushes_sent, after.push_failures) == (
            before.pushes_sent,
            before.push_failures,
        )
        assert held["k"].stats_step == 1 and after.pending_blocks == 1
    finally:
        os.kill(process.pid, signal.SIGCONT)
        client.close()
        process.terminate()
        process.wait(30)


def test_unsent_statistics_are_replaced_by_newer_ones(start_service) -> None:
    server = start_service(workers=1)
    client = PreconditionerClient(server.address, "run", **FAST)
    for step in range(1, 6):
        client.push([StatisticsBlock("k", step, 2, random_statistic(8, step))])
    client.push([StatisticsBlock("k", 2, 2, np.eye(8)), StatisticsBlock("j", 1, 2, np.eye(8))])
    assert (client.status().pending_blocks, client.status().blocks_replaced) == (2, 4)
    with client:
        assert wait_until(lambda: set(client.latest()) == {"k", "j"}, 30)
        root = client.latest()["k"]
        assert root.stats_step == 5
        np.testing.assert_allclose(
            root.root, eigh_inverse_root(random_statistic(8, 5), 2, 1e-6), rtol=1e-4, atol=1e-7
        )
        assert client.status().blocks_sent == 2
    (run,) = fetch_status(server.address).runs
    assert run.received == 2


def test_client_round_trip_and_status(start_service) -> None:
    server = start_service(workers=2)
    matrices = {
        "w|d0": (random_statistic(48, 1, np.float32), 4),
        "w|d1": (random_statistic(20, 2), 2),
        "x|d0": (random_statistic(200, 3, np.float32), 4),
        "y|d0": (random_statistic(150, 4, np.float32), 8),
    }
    with PreconditionerClient(server.address, "run", **FAST) as client:
        client.push([StatisticsBlock(key, 3, p, m) for key, (m, p) in matrices.items()])
        assert wait_until(lambda: len(client.latest()) == len(matrices), 60)
        for key, block in client.latest().items():
            matrix, p = matrices[key]
            expected = eigh_inverse_root(matrix, p, 1e-6)
            assert block.root.dtype == np.float64 and not block.root.flags.writeable
            assert np.linalg.norm(block.root - expected) / np.linalg.norm(expected) < 1e-5
            assert (block.key, block.stats_step, block.method) == (key, 3, "schur_newton")
        status = client.status()
        assert status.connected and status.pushes_sent == 1 and status.blocks_sent == 4
        assert status.preconditioners_received == 4 and status.pulls >= 1
        assert status.push_failures == 0 and status.pull_failures == 0
        assert status.last_push_latency_s > 0 and status.last_pull_latency_s > 0
        assert status.incarnation == server.service.incarnation


def test_push_packs_blocks_into_4_mib_messages_and_chunks_large_ones() -> None:
    client = PreconditionerClient("127.0.0.1:1", "run")
    small = [StatisticsBlock(f"s{i}", 1, 2, np.eye(300, dtype=np.float32)) for i in range(20)]
    matrix = np.arange(1100 * 1100, dtype=np.float32).reshape(1100, 1100)
    large = StatisticsBlock("large", 1, 2, matrix)
    pieces = client._pusher.encode([*small[:10], large, *small[10:]], [])
    encoded = [b"".join(p) for p in pieces]
    # What the push declares to the service is each message's exact size.
    assert [wire.pieces_size(p) for p in pieces] == [len(m) for m in encoded]
    assert max(map(len, encoded)) <= wire.PUSH_BATCH_BYTES < wire.MAX_REQUEST_BYTES
    messages = [pb.PushStatisticsRequest.FromString(m) for m in encoded]
    assert len(messages) == 3 and {m.run_id for m in messages} == {"run"}
    blocks = [b for m in messages for b in m.blocks]
    keys = [b.key for b in blocks if not b.data_offset]
    assert keys == [b.key for b in [*small[:10], large, *small[10:]]]
    chunks = [b for b in blocks if b.key == "large"]
    assert len(chunks) == 3 and [list(c.statistics.shape) for c in chunks] == [[1100, 1100]] * 3
    assert b"".join(c.statistics.data for c in chunks) == matrix.tobytes()


def test_rejections_are_reported(start_service) -> None:
    server = start_service(workers=1)
    with PreconditionerClient(server.address, "run", max_matrix_size=32, **FAST) as client:
        client.push(
            [
                StatisticsBlock("bad-exponent", 1, 0, np.eye(4)),
                StatisticsBlock("too-big", 1, 2, np.eye(33)),
                StatisticsBlock("good", 1, 2, np.eye(4)),
            ]
        )
        assert wait_until(lambda: "good" in client.latest(), 30)
        status = client.status()
        assert status.blocks_rejected == 2
        reasons = dict(status.last_rejections)
        assert "exponent" in reasons["bad-exponent"]
        assert "not sent" in reasons["too-big"] and "max_matrix_size" in reasons["too-big"]


def test_close_is_quick_and_idempotent_while_service_is_down() -> None:
    client = PreconditionerClient(f"127.0.0.1:{free_port()}", "run", pull_interval_s=30)
    client.start()
    client.push([StatisticsBlock("k", 1, 2, np.eye(4))])
    assert wait_until(lambda: client.status().push_failures >= 1, 10)
    client.close(timeout=60)
    client.close()
    # Its threads ended (woken from their backoff), rather than being left behind.
    assert not any(thread.is_alive() for thread in client._threads)
    assert client.latest() == {}


def test_wait_for_serving(start_service) -> None:
    assert not wait_for_serving(f"127.0.0.1:{free_port()}", timeout_s=0.5)
    assert wait_for_serving(start_service(workers=1).address, timeout_s=10)


def test_status_module_prints_table_and_json(start_service) -> None:
    server = start_service(workers=1)
    with PreconditionerClient(server.address, "run-x", **FAST) as client:
        client.push([StatisticsBlock("k", 4, 2, np.eye(4))])
        assert wait_until(lambda: "k" in client.latest(), 30)

    def status_cli(address: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "precond_service.status", f"--address={address}", *flags],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )

    table = status_cli(server.address).stdout
    # Runs are shown by digest: a run_id is what grants access to a run's roots.
    assert server.service.incarnation in table and run_digest("run-x") in table
    assert "1/1 alive" in table and "run-x" not in table
    as_json = json.loads(status_cli(server.address, "--json").stdout)
    assert as_json["published"] == 1 and as_json["runs"][0]["run_digest"] == run_digest("run-x")
    assert as_json["runs"][0]["latest_step"] == 4
    failed = status_cli(f"127.0.0.1:{free_port()}", "--timeout_s=0.5")
    assert failed.returncode == 1 and "could not get the status" in failed.stderr


def test_drop_run_lets_a_restarted_trainer_push_older_steps(start_service) -> None:
    server = start_service(workers=1)
    with PreconditionerClient(server.address, "run", **FAST) as client:
        client.push([StatisticsBlock("k", 100, 2, np.eye(4))])
        assert wait_until(lambda: "k" in client.latest(), 30)
    with PreconditionerClient(server.address, "run", **FAST) as restarted:
        assert restarted.drop_run() == 1
        restarted.push([StatisticsBlock("k", 40, 2, 2 * np.eye(4))])
        assert wait_until(lambda: restarted.latest().get("k", None) is not None, 30)
        assert restarted.latest()["k"].stats_step == 40
        assert restarted.status().blocks_rejected == 0


def test_a_refused_token_stops_the_client_with_a_clear_error(start_service) -> None:
    server = start_service(workers=1, token="s3cret")
    with PreconditionerClient(server.address, "run", token="wrong", **FAST) as client:
        client.check()  # Nothing refused yet: no error.
        client.push([StatisticsBlock("k", 1, 2, np.eye(2))])
        assert wait_until(lambda: client.status().permanent_error is not None, 30)
        with pytest.raises(PermanentServiceError, match="UNAUTHENTICATED.*token") as error:
            client.check()
        assert error.value.code is grpc.StatusCode.UNAUTHENTICATED
        # Both threads end instead of retrying: the failures stop counting.
        assert wait_until(lambda: not any(t.is_alive() for t in client._threads), 30)
        before = client.status()
        client.push([StatisticsBlock("k", 2, 2, np.eye(2))])
        client.pull_now()
        after = client.status()
        assert before.push_failures <= 1 and before.pull_failures <= 1
        assert (after.push_failures, after.pull_failures) == (
            before.push_failures,
            before.pull_failures,
        )
        assert after.pushes_sent == after.pulls == 0 and not client.latest()
        assert "precond.token_file" in after.permanent_error
