"""32 concurrent 32 MiB pushes from a client that declares nothing: the service's memory.

    python -m scripts.bench_push_burst [--out=benchmarks/push_burst.json]

Starts `python -m precond_service --workers=1 --memory_budget_mb=512`, then sends
`--pushes` concurrent pushes of one 2048 x 2048 float64 statistic (32 MiB) each, on
one connection, without the `precond-message-bytes` declaration, twice:
- chunked: as the .proto says, in messages of at most 4 MiB (`wire.push_messages`);
- whole: as a client written before chunking, in one 32 MiB message (gRPC refuses it).
Meanwhile a sampler reads the resident memory of the service's process tree (service
and workers) every 0.1 s, and asks Health on another connection (deadline 1 s). The
JSON records the peaks, health latencies, what the pushes got, and each target's
verdict, for both kinds: peak <= 912 MiB, every health check answered within 1 s.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from precond_service.client.probes import own_channel, tree_rss_bytes
from precond_service.client.process import start_service
from precond_service.common import wire
from precond_service.common.blocks import StatisticsBlock
from protos import precond_service_pb2 as pb
from scripts import harness

SOURCES = (*harness.SERVICE, "scripts/bench_push_burst.py")
MIB = 1 << 20
PEAK_TARGET_MB = 912
HEALTH_TARGET_S = 1.0


def pushes_process(address: str, messages: list[bytes], pushes: int, results: Any) -> None:
    """Sends `pushes` concurrent pushes of `messages` on one connection; puts the outcomes."""
    outcomes: collections.Counter[str] = collections.Counter()
    with own_channel(address) as channel:
        push = channel.stream_unary(  # Bytes as they are; no declaration.
            "/precond.v1.PreconditionerService/PushStatistics",
            response_deserializer=pb.PushStatisticsReply.FromString,
        )

        def one() -> None:
            try:
                reply = push(iter(messages), timeout=300)
                outcomes["accepted" if reply.accepted else "rejected"] += 1
            except grpc.RpcError as e:
                outcomes[e.code().name] += 1

        threads = [threading.Thread(target=one) for _ in range(pushes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    results.put(dict(outcomes))


def burst(address: str, pid: int, messages: list[bytes], pushes: int) -> dict:
    """Runs the pushes in a process of their own; samples memory and health meanwhile."""
    latencies: list[float] = []
    failures: list[str] = []
    peak = tree_rss_bytes(pid)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    pusher = context.Process(target=pushes_process, args=(address, messages, pushes, results))
    with own_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)  # Connected first.
        pusher.start()
        ended = None
        while ended is None or time.monotonic() < ended + 1.0:  # And 1 s after.
            if ended is None and not pusher.is_alive():
                ended = time.monotonic()
            peak = max(peak, tree_rss_bytes(pid))
            start = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TARGET_S)
                latencies.append(time.perf_counter() - start)
            except grpc.RpcError as e:
                failures.append(e.code().name)
            time.sleep(0.1)
    outcomes = results.get(timeout=60)
    pusher.join()
    return {
        "tree_rss_peak_mb": peak // MIB,
        "outcomes": outcomes,
        "health_checks": len(latencies) + len(failures),
        "health_failures": failures,
        "health_latency_max_s": round(max(latencies, default=0.0), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="benchmarks/push_burst.json", help="write the JSON report here"
    )
    parser.add_argument("--pushes", type=int, default=32, help="concurrent pushes")
    parser.add_argument("--memory_budget_mb", type=int, default=512, help="service flag")
    args = parser.parse_args(argv)
    block = StatisticsBlock("big", 1, 2, np.eye(2048))
    kinds = {
        "chunked": [b"".join(m) for m in wire.push_messages("burst", [block])],
        "whole": [wire.encode_push_request("burst", [block])],
    }
    flags = [
        "--workers=1",
        f"--memory_budget_mb={args.memory_budget_mb}",
        f"--max_streams_per_peer={args.pushes}",
    ]
    report = {
        "service_flags": flags,
        "pushes": args.pushes,
        "push_mib": block.statistics.nbytes // MIB,
    }
    verdicts = {}
    with tempfile.TemporaryDirectory() as root:
        for kind, messages in kinds.items():
            with start_service(flags, log_path=Path(root) / f"{kind}.log") as service:
                start = tree_rss_bytes(service.pid)
                result = burst(service.address, service.pid, messages, args.pushes)
            result["tree_rss_start_mb"] = start // MIB
            verdicts.update(kind_targets(kind, result))
            report[kind] = result
            print(kind, json.dumps(result), flush=True)
    harness.write(
        args.out,
        benchmark="push_burst",
        sources=SOURCES,
        results=report,
        targets=verdicts,
        # No pinning: the service and its one worker share the cores with the pushes.
        split={"service_workers": 1, "pinning": None},
    )
    for name, row in verdicts.items():
        print(f"target {name}: {row}")
    return 0 if all(row["met"] for row in verdicts.values()) else 1


def kind_targets(kind: str, result: dict) -> dict[str, dict]:
    """The targets of one kind of burst: peak memory, and health answered in time."""
    return {
        f"{kind}: peak resident memory of the service's process tree (MiB)": harness.target(
            result["tree_rss_peak_mb"], f"<= {PEAK_TARGET_MB}"
        ),
        f"{kind}: health checks not answered within {HEALTH_TARGET_S:g} s": harness.target(
            len(result["health_failures"]), "<= 0"
        ),
        f"{kind}: slowest health answer (s)": harness.target(
            result["health_latency_max_s"], f"<= {HEALTH_TARGET_S:g}"
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
