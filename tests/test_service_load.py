"""Load: 8 trainer-like client processes against one `python -m precond_service` child.

Each client is its own process (multiprocessing "spawn") with its own run_id and a few
keys; it pushes every PUSH_INTERVAL_S statistics whose spectrum encodes its index and
the step, `Q diag(lambda) Q^T` with the smallest eigenvalue `1 + client` and the spread
`1 + (step % 100) / 10`, and a `PreconditionerClient` pulls in the background. Checked:

- no cross-talk: every root a client receives is for one of its keys, at a step it
  pushed, and matches the inverse root of the very matrix it pushed then;
- no memory growth: the resident memory of the service and its workers after a
  warm-up and at the end differ by less than RSS_GROWTH_BOUND;
- no dropped newest statistic: after its last push, each client receives the root of
  its last step for every key.

The default suite runs it for 20 s; `pytest -m slow` for 3 minutes. Each run prints
its figures (pushes, roots received, RSS, latencies).
"""

from __future__ import annotations

import collections
import multiprocessing
import pathlib
import queue
import time
import uuid

import numpy as np
import pytest

from precond_service.client.probes import tree_rss_bytes
from precond_service.client.process import start_service
from precond_service.client.service_client import PreconditionerClient
from precond_service.common.blocks import StatisticsBlock
from precond_service.status import fetch_status
from protos import precond_service_pb2 as pb
from tests.conftest import wait_until

CLIENTS = 8
PUSH_INTERVAL_S = 0.2
# key -> (matrix side, exponent, dtype), like the factors of two Transformer layers.
KEYS = {
    "attention/kernel|b0.0|d0": (24, 4, np.float32),
    "attention/kernel|b0.0|d1": (16, 4, np.float32),
    "ffn/kernel|b0.0|d0": (32, 2, np.float64),
    "ffn/bias|b0|d0": (8, 2, np.float64),
}
# The service's default ridge, relative to the largest eigenvalue.
RIDGE = 1e-6
# Relative Frobenius distance of a received root to the reference root of the pushed
# statistic; one step apart, two statistics' roots differ by 1e-3 or more.
ROOT_TOLERANCE = 1e-4
# Resident memory (service and workers) that may be added between the end of the
# warm-up and the end of the run.
RSS_GROWTH_BOUND = 16 << 20
# Longest wait for each client's last roots after its last push.
FINAL_WAIT_S = 60.0


def eigenvalues(client: int, step: int, n: int) -> np.ndarray:
    """The spectrum that identifies a statistic: min 1 + client, spread 1 + (step % 100) / 10."""
    spread = 1.0 + (step % 100) / 10.0
    return (1.0 + client) + spread * np.linspace(0.0, 1.0, n)


def identify(root: np.ndarray, exponent: int) -> tuple[int, int]:
    """(client, step % 100) of the statistic whose inverse root `root` is."""
    spectrum = np.linalg.eigvalsh(root) ** -float(exponent)
    low, high = spectrum.min(), spectrum.max()
    return round(low - 1.0), round((high - low - 1.0) * 10.0) % 100


class LoadClient:
    """One trainer: its run, its keys' eigenvectors, what it pushed and what it saw."""

    def __init__(self, index: int, address: str) -> None:
        self.index = index
        self.client = PreconditionerClient(
            address, f"load-{index}-{uuid.uuid4().hex}", pull_interval_s=PUSH_INTERVAL_S
        )
        rng = np.random.default_rng(index)
        self.bases = {
            key: np.linalg.qr(rng.standard_normal((n, n)))[0] for key, (n, _, _) in KEYS.items()
        }
        self.step = 0
        self.push_times: dict[int, float] = {}
        self.unanswered = {key: collections.deque() for key in KEYS}
        self.seen: set[tuple[str, int]] = set()
        self.errors: list[str] = []
        self.max_latency_s = 0.0
        self.max_push_rpc_s = 0.0
        self.max_pull_rpc_s = 0.0

    def statistic(self, key: str, step: int) -> np.ndarray:
        n, _, dtype = KEYS[key]
        basis = self.bases[key]
        return ((basis * eigenvalues(self.index, step, n)) @ basis.T).astype(dtype)

    def expected_root(self, key: str, step: int) -> np.ndarray:
        n, exponent, _ = KEYS[key]
        matrix = self.statistic(key, step).astype(np.float64)
        spectrum, basis = np.linalg.eigh(matrix)
        spectrum = spectrum + RIDGE * spectrum.max()
        return (basis * spectrum ** (-1.0 / exponent)) @ basis.T

    def push(self) -> None:
        self.step += 1
        now = time.monotonic()
        self.push_times[self.step] = now
        blocks = []
        for key, (_, exponent, _) in KEYS.items():
            blocks.append(StatisticsBlock(key, self.step, exponent, self.statistic(key, self.step)))
            self.unanswered[key].append((self.step, now))
        self.client.push(blocks)

    def check_received(self) -> None:
        """Verifies every root not seen before; records how long pushes waited for one."""
        now = time.monotonic()
        for key, root in self.client.latest().items():
            if (key, root.stats_step) in self.seen:
                continue
            self.seen.add((key, root.stats_step))
            if key not in KEYS or root.stats_step not in self.push_times:
                self.errors.append(f"root for key {key!r} step {root.stats_step} never pushed")
                continue
            expected = self.expected_root(key, root.stats_step)
            distance = np.linalg.norm(root.root - expected) / np.linalg.norm(expected)
            if not distance < ROOT_TOLERANCE:
                client, step = identify(root.root, KEYS[key][1])
                self.errors.append(
                    f"root for {key!r} step {root.stats_step} is {distance:.3g} from the "
                    f"pushed statistic's; it looks like client {client}'s step ~{step} (mod 100)"
                )
            waiting = self.unanswered[key]
            while waiting and waiting[0][0] <= root.stats_step:
                _, pushed = waiting.popleft()
                self.max_latency_s = max(self.max_latency_s, now - pushed)
        status = self.client.status()
        self.max_push_rpc_s = max(self.max_push_rpc_s, status.last_push_latency_s or 0.0)
        self.max_pull_rpc_s = max(self.max_pull_rpc_s, status.last_pull_latency_s or 0.0)

    def has_final_roots(self) -> bool:
        self.check_received()
        latest = self.client.latest()
        return all(key in latest and latest[key].stats_step == self.step for key in KEYS)


def run_client(
    index: int,
    address: str,
    duration_s: float,
    start: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue,
) -> None:
    """A client process: pushes and checks for `duration_s`, then reports to `results`."""
    load = LoadClient(index, address)
    results.put(("ready", index))
    start.wait()
    load.client.start()
    deadline = time.monotonic() + duration_s
    next_push = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() >= next_push:
            load.push()
            next_push += PUSH_INTERVAL_S
        load.check_received()
        time.sleep(0.02)
    final_received = wait_until(load.has_final_roots, FINAL_WAIT_S, poll_s=0.05)
    status = load.client.status()
    load.client.close()
    results.put(
        (
            "done",
            {
                "index": index,
                "run_id": load.client.run_id,
                "pushes": load.step,
                "roots_seen": len(load.seen),
                "roots_received": status.preconditioners_received,
                "final_received": final_received,
                "errors": load.errors[:10],
                "error_count": len(load.errors),
                "rejected": status.blocks_rejected,
                "push_failures": status.push_failures,
                "pull_failures": status.pull_failures,
                "max_latency_s": load.max_latency_s,
                "max_push_rpc_s": load.max_push_rpc_s,
                "max_pull_rpc_s": load.max_pull_rpc_s,
            },
        )
    )


def print_figures(
    reports: list[dict],
    status: pb.ServiceStatus,
    duration_s: float,
    warm_up_s: float,
    rss: tuple[int, int, int],
) -> None:
    """One line of what the load did: pushes, roots, RSS (warm, end, max), latencies."""
    pushes = sum(r["pushes"] for r in reports)
    print(
        f"\n{CLIENTS} clients x {len(KEYS)} keys for {duration_s:.0f} s: {pushes} pushes "
        f"({pushes * len(KEYS)} statistics), {sum(r['roots_received'] for r in reports)} roots "
        f"received ({sum(r['roots_seen'] for r in reports)} distinct seen by the trainers); "
        f"service+workers RSS {rss[0] / 2**20:.1f} MiB after {warm_up_s:.0f} s warm-up, "
        f"{rss[1] / 2**20:.1f} MiB at the end, {rss[2] / 2**20:.1f} MiB at most; "
        f"max push-to-root latency {max(r['max_latency_s'] for r in reports):.2f} s, "
        f"max push RPC {max(r['max_push_rpc_s'] for r in reports):.3f} s, "
        f"max pull RPC {max(r['max_pull_rpc_s'] for r in reports):.3f} s; "
        f"service: {status.published} published, {status.coalesced} coalesced, "
        f"{status.failed} failed, mean compute {status.mean_compute_seconds * 1e3:.2f} ms"
    )


@pytest.mark.parametrize(
    "duration_s",
    [20.0, pytest.param(180.0, marks=pytest.mark.slow)],
    ids=["20s", "3min"],
)
def test_concurrent_clients_get_their_own_roots_without_memory_growth(
    tmp_path: pathlib.Path, duration_s: float
) -> None:
    log_file = tmp_path / "service.log"
    service = start_service(["--workers=2"], log_path=log_file)
    address = service.address
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    clients: list[multiprocessing.Process] = []
    try:
        clients = [
            context.Process(target=run_client, args=(i, address, duration_s, start, results))
            for i in range(CLIENTS)
        ]
        for process in clients:
            process.start()
        ready = {results.get(timeout=120)[1] for _ in range(CLIENTS)}
        assert ready == set(range(CLIENTS))
        start.set()
        warm_up_s = min(10.0, duration_s / 2)
        time.sleep(warm_up_s)
        rss_warm = tree_rss_bytes(service.pid)
        rss_max = rss_warm
        reports = []
        deadline = time.monotonic() + duration_s + FINAL_WAIT_S + 60
        while len(reports) < CLIENTS:
            try:
                reports.append(results.get(timeout=1.0)[1])
            except queue.Empty:
                assert time.monotonic() < deadline, f"clients did not finish: {reports}"
            rss_max = max(rss_max, tree_rss_bytes(service.pid))
        rss_end = tree_rss_bytes(service.pid)
        status = fetch_status(address)
    finally:
        start.set()
        for process in clients:
            process.join(30)
            if process.is_alive():
                process.kill()
        service.stop(timeout_s=30)

    reports.sort(key=lambda r: r["index"])
    print_figures(reports, status, duration_s, warm_up_s, (rss_warm, rss_end, rss_max))
    for report in reports:
        assert report["error_count"] == 0, report
        assert report["final_received"], f"client {report['index']} lacks its last roots: {report}"
        assert report["rejected"] == 0 and report["push_failures"] == 0, report
        # Pushes every 0.2 s: a client stalled for a third of the run fails this.
        assert report["pushes"] >= duration_s / PUSH_INTERVAL_S * 0.6, report
        assert report["roots_seen"] >= report["pushes"] // 4, report
    assert rss_end - rss_warm < RSS_GROWTH_BOUND, (rss_warm, rss_end)
    assert len(status.runs) == CLIENTS
    assert all(run.blocks_known == len(KEYS) for run in status.runs)
    assert (status.failed, status.workers_alive, status.worker_restarts) == (0, 2, 0)
