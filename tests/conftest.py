"""Fixtures for the preconditioner service tests: real servers on loopback port 0.

Every server started here runs real worker processes; `start_service` stops them
all at the end of the test that started them.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from precond_service.client import process as precond_process
from precond_service.client.probes import descendants, free_ports
from precond_service.server.server import RunningServer, serve
from precond_service.server.service import ServiceConfig
from protos import precond_service_pb2_grpc as pb_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m precond_service...` children: the repository importable."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 30.0, poll_s: float = 0.01
) -> bool:
    """Polls `predicate` until it is true or `timeout_s` has passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def start_service_process(
    log_path: pathlib.Path, *flags: str, port: int = 0
) -> tuple[subprocess.Popen, str]:
    """Starts `python -m precond_service --port=PORT FLAGS` as users do (`start_service`).

    Args:
        log_path: Its stdout and stderr are appended here (a file: a pipe nobody
            reads would block the service's logging).
        *flags: Further flags, e.g. "--workers=2".
        port: Loopback port; 0 picks a free one.

    Returns:
        The process and its address, once it reports SERVING; the caller stops it.
    """
    service = precond_process.start_service(flags, port=port, log_path=log_path)
    return service.process, service.address


def alive(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has ended)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def service_children() -> list[int]:
    """Pids of `python -m precond_service` processes this test process started."""
    pids = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"precond_service" in argv:
                pids.append(pid)
    return pids


def signal_tree(pid: int, signum: int) -> None:
    """Sends `signum` to a process and all its descendants (a service and its workers)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)


def random_statistic(n: int, seed: int, dtype: type = np.float64) -> np.ndarray:
    """Returns a well-conditioned symmetric PSD n x n matrix G G^T / (2n) + I / 10."""
    g = np.random.default_rng(seed).standard_normal((n, 2 * n))
    return (g @ g.T / (2 * n) + 0.1 * np.eye(n)).astype(dtype)


def eigh_inverse_root(matrix: np.ndarray, p: int, ridge_epsilon: float) -> np.ndarray:
    """Reference (A + eps * lambda_max * I)^(-1/p) by eigendecomposition, in float64."""
    w, v = np.linalg.eigh(np.asarray(matrix, dtype=np.float64))
    w = w + ridge_epsilon * w.max()
    return (v * w ** (-1.0 / p)) @ v.T


def free_port() -> int:
    """Returns a loopback port that was free a moment ago."""
    return free_ports(1)[0]


@pytest.fixture
def start_service() -> Iterator[Callable[..., RunningServer]]:
    """Starts in-process services (`start_service(workers=2, ...)`); stops them after."""
    servers: list[RunningServer] = []

    def start(*, port: int = 0, token: str | None = None, **config: object) -> RunningServer:
        config.setdefault("workers", 1)
        server = serve(ServiceConfig(**config), host="127.0.0.1", port=port, token=token)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=0.5)


@pytest.fixture
def stub_for() -> Iterator[Callable[[str], pb_grpc.PreconditionerServiceStub]]:
    """Makes raw stubs (`stub_for(address)`) with large message limits; closes them after."""
    channels: list[grpc.Channel] = []

    def make(address: str) -> pb_grpc.PreconditionerServiceStub:
        limit = 256 * 1024 * 1024
        channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        channels.append(channel)
        return pb_grpc.PreconditionerServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
