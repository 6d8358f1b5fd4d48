"""Tests of `python -m precond_service` as a real process: start, serve, shut down."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from precond_service.__main__ import main as service_main
from precond_service.client.service_client import PreconditionerClient, wait_for_serving
from precond_service.common.auth import run_digest
from precond_service.common.blocks import StatisticsBlock
from precond_service.common.events import Event, read_events
from precond_service.status import fetch_status
from tests.conftest import (
    eigh_inverse_root,
    random_statistic,
    start_service_process,
    subprocess_env,
    wait_until,
)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_service_process_serves_and_shuts_down_gracefully(
    tmp_path: pathlib.Path, stop_signal: signal.Signals
) -> None:
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "precond_service",
            "--port=0",
            "--workers=2",
            f"--port_file={port_file}",
            "--method=eigh",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert wait_until(port_file.exists, 60), "no port file"
        port = int(port_file.read_text())
        address = f"127.0.0.1:{port}"
        assert wait_for_serving(address, timeout_s=5)
        worker_pids = list(fetch_status(address).worker_pids)
        assert len(worker_pids) == 2

        matrix = random_statistic(32, seed=0)
        with PreconditionerClient(address, "run", pull_interval_s=0.02) as client:
            client.push([StatisticsBlock("k", 1, 4, matrix)])
            assert wait_until(lambda: "k" in client.latest(), 30)
            root = client.latest()["k"]
        assert root.method == "eigh"
        np.testing.assert_allclose(root.root, eigh_inverse_root(matrix, 4, 1e-6), atol=1e-8)

        process.send_signal(stop_signal)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stderr.read()
    assert f"precond_service listening on {address}" in log
    assert "precond_service stopped" in log
    for pid in worker_pids:
        assert wait_until(lambda pid=pid: not _alive(pid), 10), f"worker {pid} left running"


def test_service_process_exits_1_when_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "precond_service", f"--port={port}"],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )
    assert result.returncode == 1
    assert "could not" in result.stderr and str(port) in result.stderr


def test_service_process_rejects_bad_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "precond_service", "--workers=0"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 1 and "workers must be >= 1, got 0" in result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--max_blocks_per_run=0", "max_blocks_per_run (--max_blocks_per_run) must be >= 1, got 0"),
        ("--max_runs=-3", "max_runs (--max_runs) must be >= 1, got -3"),
        ("--max_run_id_length=0", "max_run_id_length (--max_run_id_length) must be >= 1, got 0"),
        (
            "--max_blocks_per_request=100",
            "max_blocks_per_request (--max_blocks_per_request) must be >= max_blocks_per_run=32768",
        ),
    ],
)
def test_service_rejects_caps_out_of_range(
    flag: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert service_main([flag]) == 1
    assert message in caplog.text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; only the service could reap it.
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_service_exits_when_its_parent_is_killed(tmp_path: pathlib.Path) -> None:
    # A stand-in for a trainer: starts the service with --parent_pid, then sleeps.
    port_file = tmp_path / "port"
    parent_code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'precond_service', '--port=0',\n"
        f"    '--port_file={port_file}', f'--parent_pid={{os.getpid()}}'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    service_pid = int(parent.stdout.readline())
    try:
        assert wait_until(port_file.exists, timeout_s=60)
        port = int(port_file.read_text())
        assert wait_for_serving(f"127.0.0.1:{port}", 30)
        parent.kill()  # SIGKILL: the parent cannot stop its child
        parent.wait()

        def service_gone() -> bool:
            try:
                os.kill(service_pid, 0)
            except ProcessLookupError:
                return True
            # Reparented to init (or a subreaper) and exited: a zombie until reaped.
            with open(f"/proc/{service_pid}/stat") as f:
                return f.read().split(") ")[1].startswith("Z")

        assert wait_until(service_gone, timeout_s=20, poll_s=0.1)
        assert not wait_for_serving(f"127.0.0.1:{port}", 1)
    finally:
        parent.kill()
        try:
            os.kill(service_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_service_process_writes_its_events(tmp_path: pathlib.Path) -> None:
    events_path = tmp_path / "service-events.jsonl"
    process, address = start_service_process(
        tmp_path / "service.log", "--workers=1", f"--events_file={events_path}"
    )
    try:
        (started,) = read_events(events_path, Event.SERVICE_STARTED)
        status = fetch_status(address)
        assert (started["incarnation"], started["address"]) == (status.incarnation, address)
        assert started["workers"] == 1

        (worker_pid,) = status.worker_pids
        os.kill(worker_pid, signal.SIGKILL)
        assert wait_until(lambda: read_events(events_path, Event.WORKER_RESTARTED), 30)
        (restarted,) = read_events(events_path, Event.WORKER_RESTARTED)
        assert restarted["pid"] == worker_pid and "exited" in restarted["reason"]

        with PreconditionerClient(address, "run", pull_interval_s=0.02) as client:
            client.push([StatisticsBlock("k", 1, 2, np.eye(3))])
            assert wait_until(lambda: "k" in client.latest(), 30)
            assert client.drop_run() == 1
        (dropped,) = read_events(events_path, Event.RUN_DROPPED)
        assert dropped == {**dropped, "run_digest": run_digest("run"), "blocks_released": 1}

        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert [e["event"] for e in read_events(events_path)] == [
        Event.SERVICE_STARTED,
        Event.WORKER_RESTARTED,
        Event.RUN_DROPPED,
        Event.SERVICE_STOPPED,
    ]
