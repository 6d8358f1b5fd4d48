"""Convergence on Tatoeba En-Fr: Adam, AdaGrad, Shampoo and Adam in its eigenbasis side by side.

Every optimizer gets the same learning-rate sweep (its centre times each factor
of `--lr_factors`) and the same step budget on the same model and batches (see
scripts/bench_training.py). For each optimizer the learning rate with the lowest
final dev loss is kept. Reported:

- dev loss against steps and against training wall time (two plots);
- Adam's best dev loss, and the steps and seconds each optimizer needs to
  reach it (first evaluation at or below it), as ratios to Adam's own;
- test loss and sacreBLEU (greedy decoding, the whole test split) of each
  optimizer's best run.

Optimizers (`--optimizers`): `adam`, `adagrad`, `shampoo-async` and `shampoo-sync`
(inverse roots), `soap-async` and `soap-sync` (Adam in the eigenbasis of Shampoo's
factors, configs/wmt14_en_fr.py's `soap` variants: async with the adaptive cadence and
`--soap_steps_per_loop`-step inner loops, sync with a basis every `--update_steps`),
and `adam-b95`, Adam with SOAP's published betas (0.95, 0.95), which the eigenbasis
optimizer used before the soap configs took (0.9, 0.98), so that a comparison at those
betas is not one of betas.

Paper's claim (WMT'14 En->Fr, Transformer): Shampoo reaches Adam's quality in
about half the steps and 1/1.67 of the wall time. Targets for async eigenbasis
Shampoo here: <= 0.65x the steps and <= 0.70x the wall time to Adam's best dev loss,
a final dev loss 0.08 nats below Adam's, test BLEU at least 2 above Adam's, a mean
step within 1.12x Adam's, and a final dev loss within 0.01 of sync with a basis every
10 updates.

Every run trains on the `--device_cpus` cores and async Shampoo's service
computes on `--host_cpus` (the paper's device/host split; see bench_training.py).

    .venv/bin/python scripts/bench_convergence.py [--data_dir=../shared/data]
        [--optimizers=adam,shampoo-async] [--shampoo_fields=momentum_type=gradient]

Runs already finished under `--work_dir` are reused (delete it to start over).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scripts import bench_training as bt
from scripts import harness

log = logging.getLogger("bench_convergence")

OPTIMIZERS = (
    "adam",
    "adam-b95",
    "adagrad",
    "shampoo-async",
    "shampoo-sync",
    "soap-async",
    "soap-sync",
)
# The sweeps the targets speak of, and their flag-free names in the JSON.
EIGENBASIS, EIGENBASIS_SYNC = "soap-async", "soap-sync"


def spec_for(label: str, factor: float, args: argparse.Namespace) -> bt.RunSpec:
    """The run of optimizer `label` at `factor` times its centre learning rate."""
    optimizer, _, mode = label.partition("-")
    rate = float(f"{bt.BASE_LEARNING_RATES[optimizer] * factor:.3g}")
    common = dict(num_steps=args.num_steps, update_steps=args.update_steps, **bt.regime(args))
    if optimizer == "shampoo":
        return bt.shampoo(
            mode, rate, shampoo=bt.parse_shampoo_fields(args.shampoo_fields), **common
        )
    if optimizer == "soap":
        if mode == "async":
            common.update(cadence="adaptive", steps_per_loop=args.soap_steps_per_loop)
        betas = tuple(float(b) for b in args.soap_betas.split(",")) if args.soap_betas else ()
        shampoo = bt.parse_shampoo_fields(args.shampoo_fields)
        return bt.RunSpec("soap", mode, rate, betas=betas, shampoo=shampoo, **common)
    if mode == "b95":
        return bt.first_order(optimizer, rate, betas=(0.95, 0.95), **common)
    return bt.first_order(optimizer, rate, **common)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument("--lr_factors", default="0.5,1,2", help="the learning-rate sweep")
    parser.add_argument(
        "--factors_for",
        action="append",
        default=[],
        help="LABEL=F1,F2: another sweep for one optimizer (repeatable)",
    )
    parser.add_argument("--num_steps", type=int, default=1000)
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"which of {','.join(OPTIMIZERS)} to run (adam is needed for the ratios)",
    )
    parser.add_argument(
        "--shampoo_fields",
        default="",
        help="optimizer.shampoo fields of the Shampoo and soap runs, e.g. statistics_beta2=0.98",
    )
    parser.add_argument("--update_steps", type=int, default=10, help="Shampoo's period N")
    parser.add_argument(
        "--soap_betas",
        default="",
        help="beta1,beta2 of the eigenbasis optimizer's Adam ('': the soap configs' 0.9,0.98)",
    )
    parser.add_argument(
        "--soap_steps_per_loop",
        type=int,
        default=2,
        help="inner-loop length of async soap: how often the adaptive cadence looks",
    )
    parser.add_argument(
        "--sync_sweep",
        choices=("all", "best"),
        default="all",
        help="sweep sync Shampoo too, or run it only at async Shampoo's best rate",
    )
    parser.add_argument("--out", default="benchmarks/convergence.json")
    parser.add_argument("--plot", default="benchmarks/convergence.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    factors = [float(f) for f in args.lr_factors.split(",")]
    own_factors = {
        label: [float(f) for f in values.split(",")]
        for label, _, values in (entry.partition("=") for entry in args.factors_for)
    }
    sweeps: dict[str, list[dict]] = {}
    for label in args.optimizers.split(","):
        optimizer, _, mode = label.partition("-")
        if label in own_factors:
            factors_here = own_factors[label]
        elif mode == "sync" and args.sync_sweep == "best":
            async_best = min(sweeps[f"{optimizer}-async"], key=bt.final_dev_loss)
            rate = async_best["spec"]["learning_rate"]
            factors_here = [rate / bt.BASE_LEARNING_RATES[optimizer]]
        elif mode == "b95" and args.sync_sweep == "best":
            rate = min(sweeps["adam"], key=bt.final_dev_loss)["spec"]["learning_rate"]
            factors_here = [rate / bt.BASE_LEARNING_RATES["adam"]]
        else:
            factors_here = factors
        sweeps[label] = [bt.cached_run(spec_for(label, f, args), args) for f in factors_here]
    best = {label: min(results, key=bt.final_dev_loss) for label, results in sweeps.items()}
    for label, result in best.items():
        best[label] = bt.cached_run(bt.spec_from_dict(result["spec"]), args, test=True)

    adam = best["adam"]
    target = bt.best_dev_loss(adam)
    adam_point = bt.first_reaching(adam, target)
    summary = _summarise(best, target)
    targets = _targets(summary, sweeps)
    sweep_table = {
        label: [
            {
                "learning_rate": r["spec"]["learning_rate"],
                "final_dev_loss": bt.final_dev_loss(r),
                "diverged": r["diverged"],
            }
            for r in results
        ]
        for label, results in sweeps.items()
    }
    specs = [bt.spec_from_dict(r["spec"]) for results in sweeps.values() for r in results]
    bt.write_report(
        args.out,
        args,
        specs,
        {
            "adam_best_dev_loss": target,
            "summary": summary,
            "sweeps": sweep_table,
            "best_runs": best,
        },
        script="scripts/bench_convergence.py",
        targets=targets,
    )
    plot(best, target, Path(args.plot))
    print(f"Adam's best dev loss {target:.4f} (step {adam_point['step']})")
    for label, row in summary.items():
        print(
            f"{label:14s} lr {row['learning_rate']:<7g} final dev {row['final_dev_loss']:.4f} "
            f"steps x{_fmt(row['steps_ratio_to_adam'])} time x{_fmt(row['seconds_ratio_to_adam'])} "
            f"{1000 * (row['mean_step_seconds'] or 0):.0f} ms/step test BLEU {row['test_bleu']:.2f}"
        )
    for name, target_row in targets.items():
        print(f"target {name}: {target_row}")


def _targets(summary: dict[str, dict], sweeps: dict[str, list[dict]]) -> dict[str, dict]:
    """Each target of the eigenbasis optimizer with its threshold, value and verdict."""
    if EIGENBASIS not in summary:
        return {}
    soap, adam = summary[EIGENBASIS], summary["adam"]
    rows = {
        "steps to Adam's best dev loss, ratio to Adam's": (soap["steps_ratio_to_adam"], "<=", 0.65),
        "wall time to Adam's best dev loss, ratio to Adam's": (
            soap["seconds_ratio_to_adam"],
            "<=",
            0.70,
        ),
        "final dev loss below Adam's (nats)": (
            adam["final_dev_loss"] - soap["final_dev_loss"],
            ">=",
            0.08,
        ),
        "test BLEU above Adam's": (soap["test_bleu"] - adam["test_bleu"], ">=", 2.0),
        "mean step, ratio to Adam's": (
            soap["mean_step_seconds"] / adam["mean_step_seconds"],
            "<=",
            1.12,
        ),
    }
    sync = [r for r in sweeps.get(EIGENBASIS_SYNC, []) if r["spec"]["update_steps"] == 10]
    if sync:
        rows["final dev loss, async minus sync with a basis every 10 updates (|nats|)"] = (
            abs(soap["final_dev_loss"] - min(bt.final_dev_loss(r) for r in sync)),
            "<=",
            0.01,
        )
    return {
        name: harness.target(value, f"{op} {limit}") for name, (value, op, limit) in rows.items()
    }


def _summarise(best: dict[str, dict], target: float) -> dict[str, dict]:
    """Per optimizer: its best run's losses, speed, BLEU and steps/time to Adam's best loss."""
    adam_point = bt.first_reaching(best["adam"], target)
    summary = {}
    for label, result in best.items():
        reached = bt.first_reaching(result, target)
        summary[label] = {
            "learning_rate": result["spec"]["learning_rate"],
            "final_dev_loss": bt.final_dev_loss(result),
            "best_dev_loss": bt.best_dev_loss(result),
            "mean_step_seconds": result.get("mean_step_seconds"),
            "test_loss": result.get("test_loss"),
            "test_bleu": result.get("test_bleu"),
            "steps_to_adam_best": reached and reached["step"],
            "seconds_to_adam_best": reached and reached["wall_s"],
            "steps_ratio_to_adam": reached and reached["step"] / adam_point["step"],
            "seconds_ratio_to_adam": reached and reached["wall_s"] / adam_point["wall_s"],
        }
    return summary


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def plot(best: dict[str, dict], target: float, path: Path) -> None:
    """Dev loss against steps and against wall time, best rate per optimizer."""
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, result in best.items():
        points = result["points"]
        name = f"{label} (lr {result['spec']['learning_rate']:g})"
        dev = [p["dev_loss"] for p in points]
        axes[0].plot([p["step"] for p in points], dev, marker=".", label=name)
        axes[1].plot([p["wall_s"] for p in points], dev, marker=".", label=name)
    for ax, xlabel in zip(axes, ("step", "training wall time (s)")):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="Adam's best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dev loss (nats/token)")
        ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.5))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Tatoeba En-Fr, 2-layer d=128 Transformer, trainer on 1 core, service on 1")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
