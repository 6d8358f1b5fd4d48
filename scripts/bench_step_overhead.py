"""Step time of async Shampoo, sync Shampoo, Adam and AdaGrad, interleaved in one run.

Builds the trainers of scripts/bench_training.py (same model, same seed, so the
same batches in the same order) in one process: the four with N = 10 and, by
default, async Shampoo with N = 100 too (`--more_async_periods`), brings each past Shampoo's
graft-only warm-up, then times single steps in interleaved rounds: each round
runs `--round_steps` steps of every optimizer in turn (rotating who goes first),
so that load from the rest of the machine falls on all of them alike. A step's
time is one inner loop of one step plus the host's service work after it (the
statistics push every N steps and installing roots, in async mode); in sync
mode the roots are computed inside every N-th step, so its stalls show.

Target: async Shampoo's mean step time <= 1.15x Adam's. The service's share
of the cores falls with N (one root computation per block every N steps).

On this 2-core machine the service's worker shares the cores with the trainer,
and it also computes while the other optimizers' steps run: the standalone step
times of scripts/bench_convergence.py's runs (one optimizer at a time) are the
fairer measure of what the service costs, and are reported beside these.

    .venv/bin/python scripts/bench_step_overhead.py [--data_dir=../shared/data]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_training as bt  # noqa: E402

log = logging.getLogger("bench_step_overhead")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round_steps", type=int, default=20, help="steps per optimizer per round")
    parser.add_argument("--warmup_steps", type=int, default=80, help="untimed steps first")
    parser.add_argument("--update_steps", type=int, default=10, help="Shampoo's period N")
    parser.add_argument(
        "--more_async_periods",
        default="100",
        help="further async Shampoo trainers with these periods N (comma-separated, or '')",
    )
    parser.add_argument("--out", default="benchmarks/step_overhead.json")
    parser.add_argument("--plot", default="benchmarks/step_overhead.png")
    return parser.parse_args()


def specs(args: argparse.Namespace) -> dict[str, bt.RunSpec]:
    """The optimizers at their centre rates; the budget covers warm-up and rounds."""
    steps = 1 + args.warmup_steps + args.rounds * args.round_steps
    common = dict(num_steps=steps, update_steps=args.update_steps)
    rates = bt.BASE_LEARNING_RATES
    runs = {
        "adam": bt.first_order("adam", rates["adam"], **common),
        "adagrad": bt.first_order("adagrad", rates["adagrad"], **common),
        "shampoo-async": bt.shampoo("async", rates["shampoo"], **common),
        "shampoo-sync": bt.shampoo("sync", rates["shampoo"], **common),
    }
    for period in filter(None, args.more_async_periods.split(",")):
        runs[f"shampoo-async-N{int(period)}"] = bt.shampoo(
            "async", rates["shampoo"], num_steps=steps, update_steps=int(period)
        )
    return runs


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.WARNING)
    from trainer.process_setup import setup_process
    from trainer.train import Trainer

    files, vocab_path = bt.shared_paths(args)
    runs = specs(args)
    times: dict[str, list[float]] = {label: [] for label in runs}
    with contextlib.ExitStack() as stack:
        trainers, bridges = {}, {}
        for label, spec in runs.items():
            workdir = str(Path(args.work_dir) / "step_overhead" / label)
            config = bt.bench_config(spec, files, vocab_path)
            setup_process(config)
            trainer = Trainer(config, workdir)
            if trainer.restored_step:
                raise RuntimeError(f"{workdir} holds a checkpoint: delete it first")
            trainers[label] = trainer
            bridges[label] = stack.enter_context(trainer.preconditioning())
        for label, trainer in trainers.items():
            trainer.run_steps(bridges[label], 1)  # traces the loop
            for _ in range(args.warmup_steps):
                trainer.run_steps(bridges[label], 1)
            log.info("%s warmed up", label)
        labels = list(runs)
        for round_index in range(args.rounds):
            order = labels[round_index % len(labels) :] + labels[: round_index % len(labels)]
            for label in order:
                for _ in range(args.round_steps):
                    _, seconds = trainers[label].run_steps(bridges[label], 1)
                    times[label].append(seconds)
            log.info("round %d/%d done", round_index + 1, args.rounds)
        final_staleness = {
            label: _staleness(trainer)
            for label, trainer in trainers.items()
            if label.startswith("shampoo-async")
        }

    summary = _summarise(times)
    met = {
        f"{label} mean <= 1.15x Adam (interleaved)": summary[label]["mean_ratio_to_adam"] <= 1.15
        for label in summary
        if label.startswith("shampoo-async")
    }
    bt.write_report(
        args.out,
        args,
        list(runs.values()),
        {
            "summary": summary,
            "target": met,
            "async_staleness_at_end": final_staleness,
            "step_seconds": times,
        },
    )
    plot(times, Path(bt.REPO_ROOT / args.plot), args.round_steps)
    for label, row in summary.items():
        print(
            f"{label:14s} mean {row['mean_ms']:6.1f} ms (x{row['mean_ratio_to_adam']:.2f})  "
            f"median {row['median_ms']:6.1f} ms (x{row['median_ratio_to_adam']:.2f})  "
            f"max {row['max_ms']:6.0f} ms  standalone {_fmt(row['standalone_mean_ms'])} ms"
        )
    print("targets:", met)


def _summarise(times: dict[str, list[float]]) -> dict[str, dict]:
    """Per label: mean, median, p95 and max ms/step, and the ratios to Adam's."""
    summary = {}
    adam_mean = statistics.mean(times["adam"])
    adam_median = statistics.median(times["adam"])
    standalone = _standalone_step_times()
    for label, values in times.items():
        summary[label] = {
            "mean_ms": 1000 * statistics.mean(values),
            "median_ms": 1000 * statistics.median(values),
            "p95_ms": 1000 * sorted(values)[int(0.95 * (len(values) - 1))],
            "max_ms": 1000 * max(values),
            "mean_ratio_to_adam": statistics.mean(values) / adam_mean,
            "median_ratio_to_adam": statistics.median(values) / adam_median,
            "standalone_mean_ms": standalone.get(label),
        }
    if standalone.get("adam"):
        for label in summary:
            if standalone.get(label):
                summary[label]["standalone_ratio_to_adam"] = standalone[label] / standalone["adam"]
    return summary


def _staleness(trainer) -> dict:
    import dataclasses

    from trainer.optimizers.service_bridge import staleness

    return dataclasses.asdict(staleness(trainer.optimizer))


def _standalone_step_times() -> dict[str, float]:
    """Mean ms/step of each optimizer's best run in benchmarks/convergence.json, if any."""
    path = bt.REPO_ROOT / "benchmarks" / "convergence.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())["summary"]
    return {
        label: 1000 * row["mean_step_seconds"]
        for label, row in summary.items()
        if row.get("mean_step_seconds")
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def plot(times: dict[str, list[float]], path: Path, round_steps: int) -> None:
    """Each optimizer's step times in the order it ran them."""
    plt = bt.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for label, values in times.items():
        axes[0].plot([1000 * v for v in values], linewidth=0.8, label=label)
    axes[0].set_yscale("log")
    axes[0].set_xlabel(f"timed step of that optimizer (interleaved in rounds of {round_steps})")
    axes[0].set_ylabel("step time (ms)")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    labels = list(times)
    axes[1].boxplot([[1000 * v for v in times[k]] for k in labels], showfliers=False)
    axes[1].set_xticks(range(1, len(labels) + 1), labels, rotation=30)
    axes[1].set_ylabel("step time (ms), no outliers")
    axes[1].grid(alpha=0.3)
    fig.suptitle("Step time, same model and batches, Tatoeba En-Fr, 2-core CPU")
    bt.save_figure(fig, path)


if __name__ == "__main__":
    main()
