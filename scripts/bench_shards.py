"""Root throughput of a sharded service: S shards x W workers, as speedup over one worker.

    python -m scripts.bench_shards [--n=512] [--blocks=64] [--configs=1x1,1x2,2x1]
        [--output_json=benchmarks/shards.json] [--output_png=benchmarks/shards.png]

Each configuration starts S ordinary services (`python -m precond_service
--workers=W`, each on loopback, as `precond.shards` does) and one `ShardedClient`
(a synthetic trainer: no TensorFlow, so it runs on any CPU host). A round pushes
`--blocks` statistics of side `--n` (distinct keys, a new step each round) and ends
when every root of that step is back; throughput is blocks per second, the median
over `--rounds` rounds after one warm-up round. Reported: throughput, speedup over
1 x 1, and scaling efficiency (speedup / (S x W)). Target: >= 80% up to the core
count. Cores are not pinned; the client shares them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import numpy as np

from precond_service.client.process import local_service
from precond_service.client.sharding import ShardedClient
from precond_service.common.blocks import StatisticsBlock
from scripts import harness

SOURCES = (*harness.SERVICE, "scripts/bench_shards.py")
EFFICIENCY_TARGET = 0.8


def statistics_of(n: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` well-conditioned SPD float32 matrices of side n (condition about 100)."""
    rng = np.random.default_rng(seed)
    matrices = []
    for _ in range(count):
        g = rng.standard_normal((n, 2 * n)).astype(np.float32)
        matrices.append(g @ g.T / (2 * n) + 0.01 * np.eye(n, dtype=np.float32))
    return matrices


def measure(shards: int, workers: int, args: argparse.Namespace) -> dict:
    """Throughput of S shards x W workers: median blocks/s over the rounds."""
    matrices = statistics_of(args.n, args.blocks, seed=0)
    keys = [f"layer{i}/kernel|b0.0|d0" for i in range(args.blocks)]
    seconds = []
    with contextlib.ExitStack() as stack:
        addresses = [
            stack.enter_context(local_service(workers=workers, extra_args=["--max_blocks=65536"]))
            for _ in range(shards)
        ]
        client = stack.enter_context(
            ShardedClient(addresses, f"bench-{shards}x{workers}", pull_interval_s=0.01)
        )
        for round_ in range(args.rounds + 1):
            step = round_ + 1
            began = time.perf_counter()
            client.push([StatisticsBlock(k, step, 4, m) for k, m in zip(keys, matrices)])
            deadline = began + args.timeout_s
            while not all(
                (root := client.latest().get(k)) is not None and root.stats_step == step
                for k in keys
            ):
                if time.perf_counter() > deadline:
                    raise TimeoutError(
                        f"{shards}x{workers}: round {round_} not done: {client.status()}"
                    )
                time.sleep(0.005)
            if round_:  # The first round warms up workers and connections.
                seconds.append(time.perf_counter() - began)
        per_shard = [len(c.latest()) for c in client.clients]
    median = statistics.median(seconds)
    return {
        "shards": shards,
        "workers_per_shard": workers,
        "processes": shards * workers,
        "round_seconds": seconds,
        "blocks_per_second": args.blocks / median,
        "blocks_per_shard": per_shard,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="side of each statistic")
    parser.add_argument("--blocks", type=int, default=64, help="statistics per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="1x1,1x2,2x1", help="SxW: S shards of W workers each")
    parser.add_argument("--timeout_s", type=float, default=600.0)
    parser.add_argument("--output_json", default="benchmarks/shards.json")
    parser.add_argument("--output_png", default="benchmarks/shards.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    results = []
    for shards, workers in configs:
        row = measure(shards, workers, args)
        results.append(row)
        print(f"{shards} x {workers}: {row['blocks_per_second']:.1f} blocks/s", flush=True)
    base = next(
        (r["blocks_per_second"] for r in results if r["processes"] == 1),
        results[0]["blocks_per_second"] / results[0]["processes"],
    )
    for row in results:
        row["speedup"] = row["blocks_per_second"] / base
        row["efficiency"] = row["speedup"] / row["processes"]
    cores = os.cpu_count() or 1
    within = [r["efficiency"] for r in results if r["processes"] <= cores]
    verdicts = {
        f"scaling efficiency (speedup / (S x W)), lowest up to the core count ({cores})": (
            harness.target(min(within, default=None), f">= {EFFICIENCY_TARGET}")
        )
    }
    harness.write(
        args.output_json,
        benchmark="shards",
        sources=SOURCES,
        results={
            "config": {"n": args.n, "blocks": args.blocks, "rounds": args.rounds},
            "configurations": results,
        },
        targets=verdicts,
        # Not pinned: the shards' servers, their workers and the client share every core.
        split={
            "cores": cores,
            "shards_x_workers": [f"{s}x{w}" for s, w in configs],
            "pinning": None,
        },
    )
    plot(results, args.output_png)
    for row in results:
        print(
            f"{row['shards']} shard(s) x {row['workers_per_shard']} worker(s): "
            f"{row['blocks_per_second']:.1f} blocks/s, speedup {row['speedup']:.2f}, "
            f"efficiency {row['efficiency']:.0%}"
        )
    for name, row in verdicts.items():
        print(f"target {name}: {row}")


def plot(results: list[dict], path: str) -> None:
    """Speedup against processes, one marker style per shard count."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for shards in sorted({r["shards"] for r in results}):
        rows = [r for r in results if r["shards"] == shards]
        ax.plot(
            [r["processes"] for r in rows],
            [r["speedup"] for r in rows],
            "o-",
            label=f"{shards} shard(s)",
        )
    top = max(r["processes"] for r in results)
    ax.plot([1, top], [1, top], "--", color="gray", linewidth=1, label="linear")
    ax.set_xlabel("worker processes in all (shards x workers)")
    ax.set_ylabel("speedup over 1 x 1")
    ax.grid(alpha=0.3)
    ax.legend()
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
