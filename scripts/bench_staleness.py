"""Preconditioner staleness on Tatoeba En-Fr: async Shampoo with update period N.

`--optimizer=soap` measures the eigenbasis optimizer (Adam in the eigenbasis of
Shampoo's factors) the same way, its adaptive cadence with 2-step inner loops, and
reports for each N the steps it needs to reach Adam's best dev loss in
benchmarks/convergence.json, as a ratio to Adam's (the eigenbasis gains only while
its basis is fresh).

Async Shampoo pushes its statistics every N steps and installs the roots the
service returns whenever they arrive. N runs from 1 (push after every inner
step) to a quarter of the run, at the same learning rate, model and batches
(see scripts/bench_training.py). Reported: final dev loss, and the staleness
observed (step minus the statistics step of the roots in use, over the blocks,
at each evaluation once every block holds a root).

Paper's claim: delays up to about 1200 steps cost no noticeable quality (at the
paper's scale). Target here: N = 100 within 1% of N = 1's final dev loss.

    .venv/bin/python scripts/bench_staleness.py [--data_dir=../shared/data] [--optimizer=soap]

The learning rate defaults to async Shampoo's best in benchmarks/convergence.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from scripts import bench_training as bt
from scripts import harness

log = logging.getLogger("bench_staleness")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument(
        "--periods", default="1,10,100,adaptive", help="values of N, or adaptive (N = 100 at most)"
    )
    parser.add_argument("--num_steps", type=int, default=1000)
    parser.add_argument("--optimizer", choices=("shampoo", "soap"), default="shampoo")
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
    parser.add_argument("--out", default="", help="default benchmarks/staleness[_soap].json")
    parser.add_argument("--plot", default="", help="default benchmarks/staleness[_soap].png")
    args = parser.parse_args()
    suffix = "" if args.optimizer == "shampoo" else f"_{args.optimizer}"
    args.out = args.out or f"benchmarks/staleness{suffix}.json"
    args.plot = args.plot or f"benchmarks/staleness{suffix}.png"
    return args


def default_learning_rate(optimizer: str) -> float:
    """The optimizer's best async rate from the convergence benchmark, else its centre rate."""
    summary = bt.convergence_results().get("summary", {}).get(f"{optimizer}-async")
    return summary["learning_rate"] if summary else bt.BASE_LEARNING_RATES[optimizer]


def spec_for(period: str, rate: float, args: argparse.Namespace, common: dict) -> bt.RunSpec:
    """The async run with update period `period` (an integer N, or "adaptive")."""
    fields: dict = dict(update_steps=100, cadence="adaptive") if period == "adaptive" else {}
    fields = fields or dict(update_steps=int(period))
    if args.optimizer == "soap":
        if period == "adaptive":
            # The convergence benchmark's run: N = 10 at most, looked at every 2 steps.
            fields.update(update_steps=10, steps_per_loop=2)
        return bt.RunSpec("soap", "async", rate, **fields, **common)
    return bt.shampoo(
        "async", rate, shampoo=bt.parse_shampoo_fields(args.shampoo_fields), **fields, **common
    )


def steps_ratio_to_adam(result: dict) -> float | None:
    """Steps to Adam's best dev loss in benchmarks/convergence.json over Adam's, or None."""
    report = bt.convergence_results()
    if "adam_best_dev_loss" not in report:
        return None
    target = report["adam_best_dev_loss"]
    adam = bt.first_reaching(report["best_runs"]["adam"], target)
    reached = bt.first_reaching(result, target)
    return reached and reached["step"] / adam["step"]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rate = args.learning_rate or default_learning_rate(args.optimizer)
    common = dict(num_steps=args.num_steps) | bt.regime(args)
    specs = [spec_for(period, rate, args, common) for period in args.periods.split(",")]
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
                "steps_ratio_to_adam": steps_ratio_to_adam(result),
                "curve": result["points"],
            }
        )
    reference = rows[0]["final_dev_loss"]
    for row in rows:
        row["relative_to_first"] = row["final_dev_loss"] / reference - 1
    by_period = {row["period"]: row for row in rows}
    targets = {}
    if 1 in by_period and 100 in by_period:
        gap = abs(by_period[100]["final_dev_loss"] / by_period[1]["final_dev_loss"] - 1)
        targets["final dev loss with N = 100, relative to N = 1 (|ratio - 1|)"] = harness.target(
            gap, "<= 0.01"
        )
    bt.write_report(
        args.out,
        args,
        specs,
        {"learning_rate": rate, "periods": rows},
        script="scripts/bench_staleness.py",
        targets=targets,
    )
    plot(rows, Path(args.plot), args.optimizer)
    for row in rows:
        print(
            f"N={row['period']!s:<8s} final dev {row['final_dev_loss']:.4f} "
            f"({100 * row['relative_to_first']:+.2f}% vs N={rows[0]['period']}) staleness mean "
            f"{_fmt(row['staleness_mean'])} max {_fmt(row['staleness_max'])} steps to Adam's "
            f"best x{row['steps_ratio_to_adam'] or float('nan'):.2f}"
        )
    for name, row in targets.items():
        print(f"target {name}: {row}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def plot(rows: list[dict], path: Path, optimizer: str) -> None:
    """Dev loss against steps for each N, and final dev loss and staleness against N."""
    plt = harness.pyplot()
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
    name = "Async Shampoo" if optimizer == "shampoo" else "Adam in Shampoo's eigenbasis"
    fig.suptitle(f"{name} with preconditioner period N, Tatoeba En-Fr")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
