"""Preconditioner staleness on Tatoeba En-Fr: async Shampoo with update period N.

Async Shampoo pushes its statistics every N steps and installs the roots the
service returns whenever they arrive. N runs from 1 (push after every inner
step) to a quarter of the run, at the same learning rate, model and batches
(see scripts/bench_training.py). Reported: final dev loss, and the staleness
observed (step minus the statistics step of the roots in use, over the blocks,
at each evaluation once every block holds a root).

Paper's claim: delays up to about 1200 steps cost no noticeable quality (at the
paper's scale). Target here: N = 100 within 1% of N = 1's final dev loss.

    .venv/bin/python scripts/bench_staleness.py [--data_dir=../shared/data]

The learning rate defaults to async Shampoo's best in benchmarks/convergence.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_training as bt  # noqa: E402

log = logging.getLogger("bench_staleness")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument(
        "--periods", default="1,10,100,adaptive", help="values of N, or adaptive (N = 100 at most)"
    )
    parser.add_argument("--num_steps", type=int, default=1000)
    parser.add_argument(
        "--shampoo_fields",
        default="",
        help="optimizer.shampoo fields of the Shampoo runs, e.g. momentum_type=gradient",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=0.0,
        help="0: async Shampoo's best rate in benchmarks/convergence.json (else the centre rate)",
    )
    parser.add_argument("--out", default="benchmarks/staleness.json")
    parser.add_argument("--plot", default="benchmarks/staleness.png")
    return parser.parse_args()


def default_learning_rate() -> float:
    """Async Shampoo's best rate from the convergence benchmark, else the centre rate."""
    path = bt.REPO_ROOT / "benchmarks" / "convergence.json"
    if path.is_file():
        return json.loads(path.read_text())["summary"]["shampoo-async"]["learning_rate"]
    return bt.BASE_LEARNING_RATES["shampoo"]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rate = args.learning_rate or default_learning_rate()
    common = dict(
        num_steps=args.num_steps, shampoo=bt.parse_shampoo_fields(args.shampoo_fields)
    ) | bt.regime(args)
    specs = [
        bt.shampoo("async", rate, update_steps=100, cadence="adaptive", **common)
        if period == "adaptive"
        else bt.shampoo("async", rate, update_steps=int(period), **common)
        for period in args.periods.split(",")
    ]
    rows = []
    for spec in specs:
        result = bt.cached_run(spec, args)
        # Staleness once every block holds a root (before, "mean" covers only some).
        held = [
            p["staleness"]
            for p in result["points"]
            if p["staleness"]["fraction_preconditioned"] == 1.0
        ]
        rows.append(
            {
                "period": "adaptive" if spec.cadence == "adaptive" else spec.update_steps,
                "update_steps": spec.update_steps,
                "final_dev_loss": bt.final_dev_loss(result),
                "staleness_mean": statistics.mean(s["mean"] for s in held) if held else None,
                "staleness_max": max(s["max"] for s in held) if held else None,
                "mean_step_seconds": result.get("mean_step_seconds"),
                "curve": result["points"],
            }
        )
    reference = rows[0]["final_dev_loss"]
    for row in rows:
        row["relative_to_first"] = row["final_dev_loss"] / reference - 1
    by_period = {row["period"]: row for row in rows}
    target = None
    if 1 in by_period and 100 in by_period:
        target = abs(by_period[100]["final_dev_loss"] / by_period[1]["final_dev_loss"] - 1) <= 0.01
    bt.write_report(
        args.out,
        args,
        specs,
        {"learning_rate": rate, "results": rows, "target": {"N=100 within 1% of N=1": target}},
    )
    plot(rows, Path(bt.REPO_ROOT / args.plot))
    for row in rows:
        print(
            f"N={row['period']!s:<8s} final dev {row['final_dev_loss']:.4f} "
            f"({100 * row['relative_to_first']:+.2f}% vs N={rows[0]['period']}) staleness mean "
            f"{_fmt(row['staleness_mean'])} max {_fmt(row['staleness_max'])}"
        )
    print("target met (N=100 within 1% of N=1):", target)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def plot(rows: list[dict], path: Path) -> None:
    """Dev loss against steps for each N, and final dev loss and staleness against N."""
    plt = bt.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        curve = row["curve"]
        axes[0].plot(
            [p["step"] for p in curve],
            [p["dev_loss"] for p in curve],
            marker=".",
            label=f"N={row['period']}",
        )
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("dev loss (nats/token)")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    rows = [row for row in rows if row["period"] != "adaptive"]  # a period N on the x axis
    periods = [row["update_steps"] for row in rows]
    axes[1].plot(periods, [row["final_dev_loss"] for row in rows], marker="o", color="C0")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("update period N (steps)")
    axes[1].set_ylabel("final dev loss", color="C0")
    twin = axes[1].twinx()
    twin.plot(
        periods,
        [row["staleness_mean"] or float("nan") for row in rows],
        marker="s",
        color="C3",
    )
    twin.set_ylabel("mean staleness (steps)", color="C3")
    axes[1].grid(alpha=0.3)
    fig.suptitle("Async Shampoo with preconditioner period N, Tatoeba En-Fr")
    bt.save_figure(fig, path)


if __name__ == "__main__":
    main()
