"""The cost of repeatable asynchronous Shampoo (`precond.delay_steps`), Tatoeba En-Fr.

With `precond.delay_steps` = D the root computed from the statistics of step t
is installed at step t + D exactly, so that a run is repeatable; the trainer
waits at t + D if the root has not arrived. Free-running async mode (D = 0)
never waits but installs roots whenever they arrive. This runs async Shampoo
with N = 10 at D = 0, N, N/2 and 1 on the same model and batches (see
scripts/bench_training.py) and reports the time spent waiting, the mean step
time relative to D = 0, and the final dev loss.

    .venv/bin/python scripts/bench_delay.py [--data_dir=../shared/data]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scripts import bench_training as bt
from scripts import harness
from scripts.bench_staleness import default_learning_rate

log = logging.getLogger("bench_delay")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument("--update_steps", type=int, default=10, help="N")
    parser.add_argument("--delays", default="0,10,5,1", help="values of D (0: free-running)")
    parser.add_argument("--num_steps", type=int, default=400)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=0.0,
        help="0: async Shampoo's best rate in benchmarks/convergence.json (else the centre rate)",
    )
    parser.add_argument("--out", default="benchmarks/delay.json")
    parser.add_argument("--plot", default="benchmarks/delay.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rate = args.learning_rate or default_learning_rate("shampoo")
    specs = [
        bt.shampoo(
            "async",
            rate,
            update_steps=args.update_steps,
            num_steps=args.num_steps,
            eval_every=args.eval_every,
            delay_steps=int(d),
            **bt.regime(args),
        )
        for d in args.delays.split(",")
    ]
    rows = []
    for spec in specs:
        result = bt.cached_run(spec, args)
        pushes = spec.num_steps // spec.update_steps
        wall = result["points"][-1]["wall_s"]
        rows.append(
            {
                "delay_steps": spec.delay_steps,
                "final_dev_loss": bt.final_dev_loss(result),
                "mean_step_seconds": result.get("mean_step_seconds"),
                "train_seconds": wall,
                "wait_seconds": result.get("delay_wait_seconds", 0.0),
                "wait_seconds_per_push": result.get("delay_wait_seconds", 0.0) / pushes,
                "wait_fraction": result.get("delay_wait_seconds", 0.0) / wall,
                "curve": result["points"],
            }
        )
    free = next((row for row in rows if row["delay_steps"] == 0), None)
    for row in rows:
        row["step_time_vs_free"] = (
            row["mean_step_seconds"] / free["mean_step_seconds"] if free else None
        )
    bt.write_report(
        args.out,
        args,
        specs,
        {"learning_rate": rate, "update_steps": args.update_steps, "delays": rows},
        script="scripts/bench_delay.py",
    )
    plot(rows, Path(args.plot))
    for row in rows:
        ratio = row["step_time_vs_free"]
        print(
            f"D={row['delay_steps']:<3d} final dev {row['final_dev_loss']:.4f} | step "
            f"{1000 * row['mean_step_seconds']:.0f} ms"
            + (f" ({ratio:.2f}x free-running)" if ratio else "")
            + f" | waited {row['wait_seconds']:.1f} s ({100 * row['wait_fraction']:.1f}% of "
            f"training, {1000 * row['wait_seconds_per_push']:.0f} ms per push)"
        )


def plot(rows: list[dict], path: Path) -> None:
    """Step time split into training and waiting, and dev-loss curves, per D."""
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"D={row['delay_steps']}" if row["delay_steps"] else "free" for row in rows]
    steps = rows[0]["curve"][-1]["step"] - 1
    waits = [1000 * row["wait_seconds"] / steps for row in rows]
    totals = [1000 * row["mean_step_seconds"] for row in rows]
    axes[0].bar(labels, [t - w for t, w in zip(totals, waits)], label="training")
    axes[0].bar(labels, waits, bottom=[t - w for t, w in zip(totals, waits)], label="waiting")
    axes[0].set_ylabel("mean time per step (ms)")
    axes[0].legend()
    for row, label in zip(rows, labels):
        curve = row["curve"]
        axes[1].plot(
            [p["step"] for p in curve], [p["dev_loss"] for p in curve], marker=".", label=label
        )
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("dev loss (nats/token)")
    axes[1].grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle("Repeatable async Shampoo: roots installed D steps after their statistics")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
