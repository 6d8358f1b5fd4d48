"""Which of the reference implementations' update choices help Shampoo here (Tatoeba dev).

Async Shampoo at its centre learning rate, in the device/host regime of
bench_training.py, with this project's choices before issue 13 ("before"), once
per choice that the reference implementations make differently, and with the
defaults picked from them (see `VARIANTS`); Adam at its
centre rate gives the loss to reach. Reported per variant: final and best dev
loss, steps to Adam's best dev loss (as a ratio to Adam's own), median step
time. The defaults of `optimizer.shampoo` are picked from this table (dev split
only; the test split is never looked at here).

    .venv/bin/python scripts/bench_ablation.py [--variants=before,gradient_momentum]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scripts import bench_training as bt
from scripts import harness

log = logging.getLogger("bench_ablation")

# This project's choices before issue 13 (the paper's momentum form, layer grafting).
BEFORE = "graft_scope=layer,momentum_type=update"
DEFAULTS = "graft_scope=block,momentum_type=gradient"
# Name -> optimizer.shampoo fields. Each variant names every update choice, so a
# cached run keeps its meaning when a default changes.
VARIANTS = {
    "before": BEFORE,
    "gradient_momentum": "graft_scope=layer,momentum_type=gradient",
    "block_graft": "graft_scope=block,momentum_type=update",
    "statistics_sums": f"{BEFORE},statistics_beta2=1.0",
    "defaults": DEFAULTS,
    # The reference PyTorch implementation's ridge: 1e-12, added only where needed.
    "absolute_ridge": f"{DEFAULTS},matrix_epsilon=1e-12,ridge_mode=absolute_if_needed",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which of VARIANTS")
    parser.add_argument("--num_steps", type=int, default=1000)
    parser.add_argument("--update_steps", type=int, default=10, help="Shampoo's period N")
    parser.add_argument("--out", default="benchmarks/ablation.json")
    parser.add_argument("--plot", default="benchmarks/ablation.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common = dict(num_steps=args.num_steps, update_steps=args.update_steps, **bt.regime(args))
    adam = bt.cached_run(bt.first_order("adam", bt.BASE_LEARNING_RATES["adam"], **common), args)
    target = bt.best_dev_loss(adam)
    adam_step = bt.first_reaching(adam, target)["step"]
    results, table = {}, {}
    for name in args.variants.split(","):
        fields = bt.parse_shampoo_fields(VARIANTS[name])
        spec = bt.shampoo("async", bt.BASE_LEARNING_RATES["shampoo"], shampoo=fields, **common)
        results[name] = result = bt.cached_run(spec, args)
        reached = bt.first_reaching(result, target)
        table[name] = {
            "fields": dict(fields),
            "final_dev_loss": bt.final_dev_loss(result),
            "best_dev_loss": bt.best_dev_loss(result),
            "steps_ratio_to_adam": reached and reached["step"] / adam_step,
            "mean_step_seconds": result.get("mean_step_seconds"),
            "diverged": result["diverged"],
        }
    best = min(table, key=lambda name: table[name]["best_dev_loss"])
    specs = [bt.spec_from_dict(r["spec"]) for r in [adam, *results.values()]]
    bt.write_report(
        args.out,
        args,
        specs,
        {
            "adam_best_dev_loss": target,
            "adam_mean_step_seconds": adam.get("mean_step_seconds"),
            "variants": table,
            "lowest_best_dev_loss": best,
        },
        script="scripts/bench_ablation.py",
    )
    plot(adam, results, target, Path(args.plot))
    for name, row in table.items():
        ratio = row["steps_ratio_to_adam"]
        print(
            f"{name:32s} best dev {row['best_dev_loss']:.4f} final {row['final_dev_loss']:.4f} "
            f"steps to Adam's best x{'n/a' if ratio is None else f'{ratio:.2f}'}"
        )
    print(f"Adam's best dev loss {target:.4f}; lowest best dev loss: {best}")


def plot(adam: dict, results: dict[str, dict], target: float, path: Path) -> None:
    """Dev loss against steps for Adam and each variant."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in {"adam": adam, **results}.items():
        points = result["points"]
        ax.plot([p["step"] for p in points], [p["dev_loss"] for p in points], label=name)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="Adam's best")
    ax.set_xlabel("step")
    ax.set_ylabel("dev loss (nats/token)")
    ax.set_ylim(top=target + 1.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle("Shampoo update choices, Tatoeba En-Fr dev")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
