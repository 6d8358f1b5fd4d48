"""Learning-rate tolerance on Tatoeba En-Fr: async Shampoo, AdaGrad, Adam in the eigenbasis.

Each optimizer trains at its best learning rate from the convergence sweep
(benchmarks/convergence.json; without it, the sweep's centre rate) times each
factor of `--lr_factors` (x0.3 ... x3) with the same budget, model and batches
(see scripts/bench_training.py). Reported: the final dev loss at each rate and its
spread (largest minus smallest; a diverged run counts as infinite).

`--optimizers=soap-async,soap-sync,...` adds Adam in Shampoo's eigenbasis, async with the
adaptive cadence (2-step loops) and sync with a basis every N, as bench_convergence.py
runs them.

Paper's claim: Shampoo is more tolerant of the learning rate than AdaGrad.
Target here: Shampoo's spread smaller than AdaGrad's.

    .venv/bin/python scripts/bench_lr_tolerance.py [--data_dir=../shared/data]

Runs of scripts/bench_convergence.py at the same rates are reused.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from scripts import bench_training as bt
from scripts import harness

log = logging.getLogger("bench_lr_tolerance")

# Shampoo grafting Adam's step size, Shampoo grafting AdaGrad's (with summed
# statistics, as the paper's AdaGrad comparison), and AdaGrad itself.
OPTIMIZERS = ("shampoo-async", "shampoo-async-adagrad-graft", "adagrad", "soap-async", "soap-sync")
ADAGRAD_GRAFT = (("graft_type", "adagrad"), ("statistics_beta2", 1.0))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument("--lr_factors", default="0.3,0.5,1,2,3")
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"which of {','.join(OPTIMIZERS)} (shampoo-async and adagrad give the target)",
    )
    parser.add_argument("--num_steps", type=int, default=1000)
    parser.add_argument(
        "--shampoo_fields",
        default="",
        help="optimizer.shampoo fields of the Shampoo runs, e.g. momentum_type=gradient",
    )
    parser.add_argument("--update_steps", type=int, default=10, help="Shampoo's period N")
    parser.add_argument("--out", default="benchmarks/lr_tolerance.json")
    parser.add_argument("--plot", default="benchmarks/lr_tolerance.png")
    return parser.parse_args()


def centre_rates() -> dict[str, float]:
    """Each optimizer's best rate in benchmarks/convergence.json, else the sweep's centre."""
    summary = bt.convergence_results().get("summary", {})
    # Grafting AdaGrad's step size, Shampoo takes AdaGrad's scale of rates.
    own = {label: label for label in OPTIMIZERS} | {
        "shampoo-async-adagrad-graft": "adagrad",
        "soap-sync": "soap-async",
    }
    return {
        label: summary[own[label]]["learning_rate"]
        if own[label] in summary
        else bt.BASE_LEARNING_RATES[own[label].partition("-")[0]]
        for label in OPTIMIZERS
    }


def spec_for(label: str, rate: float, args: argparse.Namespace) -> bt.RunSpec:
    """The run of `label` (one of OPTIMIZERS) at `rate`, 3 significant digits."""
    rate = float(f"{rate:.3g}")
    common = dict(num_steps=args.num_steps, update_steps=args.update_steps, **bt.regime(args))
    fields = dict(bt.parse_shampoo_fields(args.shampoo_fields))
    if label == "shampoo-async-adagrad-graft":
        fields.update(ADAGRAD_GRAFT)
    if label.startswith("shampoo"):
        return bt.shampoo("async", rate, shampoo=tuple(sorted(fields.items())), **common)
    if label == "soap-async":
        return bt.RunSpec("soap", "async", rate, cadence="adaptive", steps_per_loop=2, **common)
    if label == "soap-sync":
        return bt.RunSpec("soap", "sync", rate, **common)
    return bt.first_order(label, rate, **common)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    factors = [float(f) for f in args.lr_factors.split(",")]
    centres = centre_rates()
    labels = args.optimizers.split(",")
    grid = {label: [spec_for(label, centres[label] * f, args) for f in factors] for label in labels}
    specs = [spec for label in labels for spec in grid[label]]
    results = {spec.name: bt.cached_run(spec, args) for spec in specs}
    table: dict[str, dict] = {}
    for label in labels:
        rows = []
        for factor, spec in zip(factors, grid[label]):
            result = results[spec.name]
            rows.append(
                {
                    "factor": factor,
                    "learning_rate": result["spec"]["learning_rate"],
                    "final_dev_loss": bt.final_dev_loss(result),
                    "diverged": result["diverged"],
                }
            )
        losses = [row["final_dev_loss"] for row in rows]
        table[label] = {
            "centre_learning_rate": centres[label],
            "runs": rows,
            "spread": max(losses) - min(losses),
            "best": min(losses),
            "worst": max(losses),
        }
    targets = {}
    if {"shampoo-async", "adagrad"} <= table.keys():
        targets["Shampoo's spread minus AdaGrad's (nats)"] = harness.target(
            table["shampoo-async"]["spread"] - table["adagrad"]["spread"], "< 0"
        )
    bt.write_report(
        args.out,
        args,
        specs,
        {
            "optimizers": table,
            "curves": {name: result["points"] for name, result in results.items()},
        },
        script="scripts/bench_lr_tolerance.py",
        targets=targets,
    )
    plot(table, Path(args.plot))
    for label, row in table.items():
        losses = ", ".join(f"x{r['factor']:g}: {r['final_dev_loss']:.3f}" for r in row["runs"])
        print(f"{label:14s} spread {row['spread']:.3f}  ({losses})")
    for name, row in targets.items():
        print(f"target {name}: {row}")


def plot(table: dict[str, dict], path: Path) -> None:
    """Final dev loss against the learning-rate factor, one line per optimizer."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, row in table.items():
        runs = [r for r in row["runs"] if math.isfinite(r["final_dev_loss"])]
        ax.plot(
            [r["factor"] for r in runs],
            [r["final_dev_loss"] for r in runs],
            marker="o",
            label=f"{label} (spread {row['spread']:.3f})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate / best rate of the convergence sweep")
    ax.set_ylabel("final dev loss (nats/token)")
    ax.set_title("Learning-rate tolerance, Tatoeba En-Fr")
    ax.grid(alpha=0.3)
    ax.legend()
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
