"""Hostile clients next to a training run: what they cost the trainer and the service.

    python -m scripts.chaos_hostile --steps=200 --out=/tmp/hostile.json

Starts a `python -m precond_service` and a trainer (the small async-Shampoo job of
`chaos.py`) that uses it, and while the trainer runs, hostile clients in this process
(in a process of their own, each its own connection) keep at the service:
- idle pushes: streams that never send a message, opened again as they are closed;
- unread pulls: pulls of a run with a large root whose replies are never read;
- large pushes: 32 MiB statistics in 4 MiB chunks from several threads at once, against the budget
  (undeclared, as from a client generated from the .proto; or, with
  `--declare_large_pushes`, declaring their size as `PreconditionerClient` does);
- a run flood: a new run id in every push, against --max_runs.
A sampler checks health every `--sample_s` (deadline 5 s) and the resident memory of
the service's process tree (service and workers). Reported, to stdout and as JSON to
`--out` (default benchmarks/chaos_hostile.json): steps lost (steps the trainer did not
finish), its stall time (longest gap between its progress events, and their median),
peak RSS, health latencies and failures, and what the service refused. Its targets: the
trainer finished every step, every health check answered, and the service's process
tree stayed within --memory_budget_mb plus the 400 MiB overhead the README states.
Exit status 0 (and "passed") when all are met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from precond_service.client.probes import own_channel, rss_bytes, tree_rss_bytes
from precond_service.client.process import start_service
from precond_service.common import wire
from precond_service.common.blocks import StatisticsBlock
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc
from scripts import harness
from scripts.chaos import log, subprocess_env, trainer_command
from scripts.chaos_report import TrainerEvents

SOURCES = (
    *harness.PRODUCT,
    "scripts/chaos_hostile.py",
    "scripts/chaos.py",
    "scripts/chaos_report.py",
)
MIB = 1 << 20

# What the service's process tree may hold beyond --memory_budget_mb (docs/SERVICE.md's
# "Memory" section): interpreters, gRPC's per-stream receive buffers, the workers.
MEMORY_OVERHEAD_MB = 400


def hostile_process(
    address: str, args: argparse.Namespace, stop: Any, results: Any, ready: Any
) -> None:
    """Runs the hostile clients in a process of their own until `stop` is set.

    Apart from the sampler, so that their serialization work does not hold the GIL
    of the process that measures health latencies.
    """
    hostiles = Hostiles(address, args)
    hostiles.start()
    ready.set()
    stop.wait(args.timeout_s + 60)
    hostiles.join()
    results.put(hostiles.counts)


class Hostiles:
    """The hostile clients: threads that run until `stop` is set; counts what happened."""

    def __init__(self, address: str, args: argparse.Namespace) -> None:
        self.address = address
        self.args = args
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def count(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def start(self) -> None:
        self._publish_large_root()
        targets: list[tuple[str, Callable[[], None]]] = [
            *[("idle-push", self._idle_pushes)] * self.args.idle_connections,
            ("unread-pull", self._unread_pulls),
            *[("large-push", self._large_pushes)] * self.args.large_push_threads,
            ("run-flood", self._run_flood),
        ]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _publish_large_root(self) -> None:
        with own_channel(self.address) as channel:
            stub = pb_grpc.PreconditionerServiceStub(channel)
            block = StatisticsBlock("big", 1, 2, np.eye(1536) * 2.0)
            requests = [
                pb.PushStatisticsRequest.FromString(b"".join(message))
                for message in wire.push_messages("hostile-big", [block])
            ]
            stub.PushStatistics(iter(requests), timeout=120)

    def _silent(self) -> Iterator[pb.PushStatisticsRequest]:
        self.stop.wait(3600)
        return
        yield

    def _idle_pushes(self) -> None:
        """Keeps `--idle_streams` pushes open on one connection, opening new ones as they end."""
        with own_channel(self.address) as channel:
            stub = pb_grpc.PreconditionerServiceStub(channel)
            open_calls: list[grpc.Future] = []
            while not self.stop.is_set():
                for call in [c for c in open_calls if c.done()]:
                    open_calls.remove(call)
                    error = call.exception()
                    self.count(f"idle-push ended {error.code().name if error else 'OK'}")
                while len(open_calls) < self.args.idle_streams:
                    open_calls.append(stub.PushStatistics.future(self._silent(), timeout=3600))
                    self.count("idle-push opened")
                self.stop.wait(0.5)
            for call in open_calls:
                call.cancel()

    def _unread_pulls(self) -> None:
        """Keeps `--unread_pulls` pulls of the large root open and unread."""
        with own_channel(self.address) as channel:
            stub = pb_grpc.PreconditionerServiceStub(channel)
            request = pb.GetPreconditionersRequest(run_id="hostile-big")
            calls = []
            while not self.stop.is_set():
                calls = [c for c in calls if c.is_active()]
                while len(calls) < self.args.unread_pulls:
                    calls.append(stub.GetPreconditioners(request, timeout=3600))
                    self.count("unread-pull opened")
                self.stop.wait(0.5)
            for call in calls:
                call.cancel()

    def _large_pushes(self) -> None:
        """Pushes 32 MiB statistics (2048 x 2048 float64), in 4 MiB chunks, back to back."""
        block = StatisticsBlock("large", 1, 2, np.eye(2048))
        with own_channel(self.address) as channel:
            push = channel.stream_unary(  # Bytes as they are.
                "/precond.v1.PreconditionerService/PushStatistics",
                response_deserializer=pb.PushStatisticsReply.FromString,
            )
            step = 0
            while not self.stop.is_set():
                step += 1
                run_id = f"hostile-large-{threading.get_ident()}"
                messages = [
                    b"".join(m)
                    for m in wire.push_messages(run_id, [dataclasses.replace(block, step=step)])
                ]
                # Declared as PreconditionerClient declares it (--declare_large_pushes):
                # admitted or refused before it is read; otherwise each message is
                # counted once received, before it is parsed.
                declared = (
                    ((wire.MESSAGE_BYTES_METADATA, str(max(map(len, messages)))),)
                    if self.args.declare_large_pushes
                    else ()
                )
                try:
                    push(iter(messages), timeout=60, metadata=declared)
                    self.count("large-push accepted")
                except grpc.RpcError as e:
                    self.count(f"large-push {e.code().name}")
                    self.stop.wait(0.05)

    def _run_flood(self) -> None:
        """A new run in every push, a small statistic each."""
        block = wire.statistics_to_message(StatisticsBlock("k", 1, 2, np.eye(4)))
        with own_channel(self.address) as channel:
            stub = pb_grpc.PreconditionerServiceStub(channel)
            index = 0
            while not self.stop.is_set():
                index += 1
                request = pb.PushStatisticsRequest(run_id=f"flood-{index}", blocks=[block])
                try:
                    reply = stub.PushStatistics(iter([request]), timeout=30)
                    self.count("flood accepted" if reply.accepted else "flood rejected")
                except grpc.RpcError as e:
                    self.count(f"flood {e.code().name}")
                self.stop.wait(0.01)


class Sampler:
    """Checks health and the service tree's RSS every `period_s` until stopped."""

    def __init__(self, address: str, pid: int, period_s: float) -> None:
        self.address, self.pid, self.period_s = address, pid, period_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss: list[int] = []
        self.server_rss: list[int] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self.stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with own_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop.wait(self.period_s):
                self.rss.append(tree_rss_bytes(self.pid))
                self.server_rss.append(rss_bytes(self.pid))
                began = time.perf_counter()
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    self.latencies.append(time.perf_counter() - began)
                except grpc.RpcError as e:
                    self.failures.append(e.code().name)


def progress_gaps(events: TrainerEvents) -> list[float]:
    """Seconds between consecutive progress events of the trainer."""
    times = [event["time"] for event in events.progress]
    return [later - earlier for earlier, later in zip(times, times[1:])]


def service_figures(address: str) -> dict[str, int]:
    with own_channel(address) as channel:
        status = pb_grpc.PreconditionerServiceStub(channel).GetStatus(
            pb.StatusRequest(), timeout=30
        )
    names = (
        "streams_refused",
        "streams_timed_out",
        "memory_refused",
        "memory_held_bytes",
        "memory_budget_bytes",
        "rejected",
    )
    return {name: getattr(status, name) for name in names}


def run(args: argparse.Namespace, root: Path) -> tuple[dict, dict[str, dict]]:
    """Runs the trainer beside the hostile clients; returns the report and its targets."""
    flags = [
        f"--workers={args.workers}",
        f"--memory_budget_mb={args.memory_budget_mb}",
        f"--stream_idle_timeout_s={args.stream_idle_timeout_s}",
        "--max_runs=64",
    ]
    with start_service(flags, log_path=root / "service.log") as service:
        rss_start = tree_rss_bytes(service.pid)
        sampler = Sampler(service.address, service.pid, args.sample_s)
        sampler.start()
        context = multiprocessing.get_context("spawn")
        stop, ready, results = context.Event(), context.Event(), context.Queue()
        hostiles = context.Process(
            target=hostile_process, args=(service.address, args, stop, results, ready)
        )
        hostiles.start()
        ready.wait(300)
        log(f"service {service.address}, hostile clients started; starting the trainer")
        workdir = root / "work"
        command = trainer_command(args, workdir, service.address, root / "spm.model")
        with open(root / "trainer.log", "w") as trainer_log:
            trainer = subprocess.Popen(
                command,
                cwd=harness.REPO_ROOT,
                env=subprocess_env(),
                stdout=trainer_log,
                stderr=trainer_log,
            )
            try:
                returncode = trainer.wait(args.timeout_s)
            except subprocess.TimeoutExpired:
                trainer.kill()
                returncode = trainer.wait()
        stop.set()
        counts = results.get(timeout=300)
        hostiles.join(60)
        sampler.join()
        figures = service_figures(service.address)
        rss_end = tree_rss_bytes(service.pid)
    events = TrainerEvents(workdir / "events.jsonl")
    events.read()
    finished = events.finished_step()
    gaps = progress_gaps(events)
    latencies = sorted(sampler.latencies)
    steps_lost = args.steps - (finished if finished is not None else events.step)
    memory_bound_mb = args.memory_budget_mb + MEMORY_OVERHEAD_MB
    verdicts = {
        "trainer finished every step (a FINISHED event at --steps)": harness.target(
            int(finished == args.steps), ">= 1"
        ),
        "steps lost (steps the trainer did not finish)": harness.target(steps_lost, "<= 0"),
        "health checks not answered (deadline 5 s)": harness.target(len(sampler.failures), "<= 0"),
        "peak resident memory of the service's process tree (MiB), "
        f"at most --memory_budget_mb + {MEMORY_OVERHEAD_MB}": harness.target(
            max(sampler.rss, default=0) / MIB, f"<= {memory_bound_mb}"
        ),
    }
    report = {
        "steps": args.steps,
        "trainer_exit_status": returncode,
        "finished_step": finished,
        "steps_lost": steps_lost,
        "longest_progress_gap_s": round(max(gaps), 3) if gaps else None,
        "median_progress_gap_s": round(statistics.median(gaps), 3) if gaps else None,
        "service_rss_mb": {
            "start": rss_start // MIB,
            "peak": max(sampler.rss, default=0) // MIB,
            "end": rss_end // MIB,
            "peak_without_workers": max(sampler.server_rss, default=0) // MIB,
        },
        "memory_budget_mb": args.memory_budget_mb,
        "large_pushes_declared": args.declare_large_pushes,
        "health_checks": len(latencies),
        "health_failures": sampler.failures,
        "health_latency_s": {
            "median": round(statistics.median(latencies), 4) if latencies else None,
            "max": round(latencies[-1], 4) if latencies else None,
        },
        "hostile": dict(sorted(counts.items())),
        "service": figures,
        "memory_bound_mb": memory_bound_mb,
        "passed": all(row["met"] for row in verdicts.values()),
    }
    return report, verdicts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument(
        "--out", default="benchmarks/chaos_hostile.json", help="write the JSON report here"
    )
    parser.add_argument("--workdir", help="directory of the run (default: a new temporary one)")
    parser.add_argument("--config", default="configs/quickstart.py", help="trainer config file")
    parser.add_argument("--trainer_flag", action="append", default=[], help="further flag")
    parser.add_argument("--checkpoint_every", type=int, default=50, help="steps per checkpoint")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes")
    parser.add_argument("--memory_budget_mb", type=int, default=512, help="service byte budget")
    parser.add_argument("--stream_idle_timeout_s", type=float, default=10.0, help="service flag")
    parser.add_argument(
        "--idle_connections", type=int, default=4, help="connections of idle pushes"
    )
    parser.add_argument("--idle_streams", type=int, default=16, help="idle pushes per connection")
    parser.add_argument("--unread_pulls", type=int, default=16, help="unread pulls held open")
    parser.add_argument("--large_push_threads", type=int, default=4, help="32 MiB pushers")
    parser.add_argument(
        "--declare_large_pushes",
        action="store_true",
        help="the 32 MiB pushes declare their size (precond-message-bytes), as the client does",
    )
    parser.add_argument("--sample_s", type=float, default=0.2, help="health and RSS period")
    parser.add_argument("--timeout_s", type=float, default=1800, help="longest training run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="chaos_hostile_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    report, verdicts = run(args, root)
    harness.write(
        args.out,
        benchmark="chaos_hostile",
        sources=SOURCES,
        results=report,
        targets=verdicts,
        # No pinning: the trainer, the service, its workers and the hostile clients share
        # every core.
        split={"service_workers": args.workers, "pinning": None},
    )
    print(json.dumps(report, indent=2))
    for name, row in verdicts.items():
        print(f"target {name}: {row}")
    log(f"report written to {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
