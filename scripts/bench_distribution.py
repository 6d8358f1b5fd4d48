"""Step time of data-parallel training on a CPU: `none` vs `mirrored` vs `multi_worker`.

    python -m scripts.bench_distribution [--num_steps=100] [--tokens_per_batch=2048]
        [--output_json=benchmarks/distribution.json] [--output_png=benchmarks/distribution.png]

A correctness run, not a speed claim: on a CPU the replicas share the
same cores, so data parallelism can only add the cost of its all-reduces. Each
configuration is `python -m trainer --config=configs/quickstart.py` with async
Shampoo and the same global batch (`data.tokens_per_batch`, split over the
replicas), started the way a user starts it:

- `none`: one process, one device;
- `mirrored`: one process, `train.virtual_cpu_devices=2` logical CPU devices;
- `multi_worker`: two processes on loopback, configured by TF_CONFIG.

Reported per configuration: the median step time (`results.json`'s
`step_ms_median`, service work included), its ratio to `none`, and the final
training and dev loss (close to `none`'s: the same data in a different batching).
No core pinning: the runs get the whole machine in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from precond_service.client.probes import free_ports
from scripts import harness

SOURCES = (*harness.PRODUCT, "scripts/bench_distribution.py")
CONFIGURATIONS = ("none", "mirrored", "multi_worker")


def trainer_command(workdir: pathlib.Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """`python -m trainer` on the quickstart config with the benchmark's fields."""
    return [
        sys.executable,
        "-m",
        "trainer",
        "--config=configs/quickstart.py",
        f"--workdir={workdir}",
        f"--config.train.num_steps={args.num_steps}",
        f"--config.data.tokens_per_batch={args.tokens_per_batch}",
        "--config.train.device_cpus=",
        "--config.precond.host_cpus=",
        "--config.train.eval_every_steps=0",
        *extra,
    ]


def run(configuration: str, scratch: pathlib.Path, args: argparse.Namespace) -> dict:
    """Trains one configuration; returns its figures from the chief's results.json."""
    workdir = scratch / configuration
    commands: list[tuple[list[str], dict[str, str]]] = []
    if configuration == "none":
        commands.append((trainer_command(workdir, args), {}))
    elif configuration == "mirrored":
        extra = ("--config.train.distribution=mirrored", "--config.train.virtual_cpu_devices=2")
        commands.append((trainer_command(workdir, args, *extra), {}))
    else:
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
        for index in range(2):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            commands.append(
                (
                    trainer_command(workdir, args, "--config.train.distribution=multi_worker"),
                    {"TF_CONFIG": json.dumps(tf_config)},
                )
            )
    began = time.perf_counter()
    processes = []
    for index, (command, env) in enumerate(commands):
        log = open(scratch / f"{configuration}-{index}.log", "wb")  # noqa: SIM115
        processes.append(
            subprocess.Popen(
                command, cwd=harness.REPO_ROOT, env=dict(os.environ, **env), stdout=log, stderr=log
            )
        )
    for process in processes:
        if process.wait(timeout=args.timeout_s) != 0:
            raise RuntimeError(
                f"{configuration}: {process.args[:4]} exited {process.returncode}; see "
                f"{scratch}/{configuration}-*.log"
            )
    results = json.loads((workdir / "results.json").read_text())
    return {
        "configuration": configuration,
        "processes": len(commands),
        "replicas": 1 if configuration == "none" else 2,
        "step_ms_median": results["step_ms_median"],
        "train_loss": results["train_loss"],
        "dev_loss": results["dev_loss"],
        "wall_s": time.perf_counter() - began,
    }


def plot(rows: list[dict], path: str) -> None:
    """Bars of the median step time per configuration."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = [row["configuration"] for row in rows]
    ax.bar(names, [row["step_ms_median"] for row in rows], color=["#555", "#37a", "#a73"])
    for i, row in enumerate(rows):
        ax.text(i, row["step_ms_median"], f"{row['ratio_to_none']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"Same global batch, async Shampoo, {os.cpu_count()}-core CPU")
    harness.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_steps", type=int, default=100)
    parser.add_argument("--tokens_per_batch", type=int, default=2048, help="the global batch")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS))
    parser.add_argument("--timeout_s", type=float, default=1800.0)
    parser.add_argument("--output_json", default="benchmarks/distribution.json")
    parser.add_argument("--output_png", default="benchmarks/distribution.png")
    args = parser.parse_args()
    configurations = args.configurations.split(",")
    if not set(configurations) <= set(CONFIGURATIONS) or "none" not in configurations:
        parser.error(f"--configurations: 'none' and any of {CONFIGURATIONS}")
    with tempfile.TemporaryDirectory(prefix="bench_distribution_") as scratch:
        rows = []
        for configuration in configurations:
            row = run(configuration, pathlib.Path(scratch), args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next(row for row in rows if row["configuration"] == "none")
    for row in rows:
        row["ratio_to_none"] = row["step_ms_median"] / base["step_ms_median"]
    harness.write(
        args.output_json,
        benchmark="distribution",
        sources=SOURCES,
        results={
            "config": {
                "base": "configs/quickstart.py",
                "optimizer": "shampoo, precond.mode=async (trainer-started service)",
                "num_steps": args.num_steps,
                "global_tokens_per_batch": args.tokens_per_batch,
            },
            "configurations": rows,
            "note": "a correctness run on one CPU, not a speed claim: replicas share the cores",
        },
        targets={},
        # train.device_cpus and precond.host_cpus empty: no pinning, each configuration's
        # trainers and their service share the whole machine, one configuration at a time.
        split={"train.device_cpus": "", "precond.host_cpus": "", "pinning": None},
    )
    plot(rows, args.output_png)
    print(f"wrote {args.output_json} and {args.output_png}")


if __name__ == "__main__":
    main()
