"""Step time of Shampoo (roots or eigenbasis, async and sync), Adam and AdaGrad, interleaved.

Builds the trainers of scripts/bench_training.py (same model, same seed, so the same
batches in the same order) in one process: the four with N = 10, async Shampoo with the
periods of `--async_periods` (default N = 1 and 100) and with the adaptive cadence, and
"shampoo-in-graph": async Shampoo holding roots for every block but doing no service
work, whose step is Shampoo's in-graph cost alone. The eigenbasis optimizer
(configs/wmt14_en_fr.py's `soap`) runs the same three ways: "soap-async" (adaptive
cadence, N = 10 at most), "soap-sync" (a basis every 10 steps) and "soap-in-graph" (its
rotations alone). It brings each past Shampoo's graft-only warm-up, then times single
steps in interleaved rounds: each round runs `--round_steps` steps of every optimizer in
turn (rotating who goes first), so that load from the rest of the machine falls on all
of them alike. A step's time is one inner loop of one step plus the host's service work
after it (reading the statistics every N steps and installing roots, in async mode); in
sync mode the roots are computed inside every N-th step, so its stalls show.

The paper's regime, emulated on a CPU machine: every trainer runs on the
`--device_cpus` cores (default the lowest one; TensorFlow's pools sized to them)
and the services and their workers on `--host_cpus` (default the others), so
Adam gets exactly the compute Shampoo's training step gets.

Targets: async Shampoo's median step time <= 1.10x Adam's (stretch 1.05x); the
eigenbasis optimizer's <= 1.12x.

    .venv/bin/python scripts/bench_step_overhead.py [--data_dir=../shared/data]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

from scripts import bench_training as bt
from scripts import harness

log = logging.getLogger("bench_step_overhead")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.add_common_flags(parser)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round_steps", type=int, default=20, help="steps per optimizer per round")
    parser.add_argument("--warmup_steps", type=int, default=80, help="untimed steps first")
    parser.add_argument("--update_steps", type=int, default=10, help="Shampoo's period N")
    parser.add_argument(
        "--async_periods",
        default="1,100",
        help="further async Shampoo trainers with these periods N (comma-separated, or '')",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated labels to run (adam always runs: the ratios are to it)",
    )
    parser.add_argument("--out", default="benchmarks/step_overhead.json")
    parser.add_argument("--plot", default="benchmarks/step_overhead.png")
    return parser.parse_args()


def specs(args: argparse.Namespace) -> dict[str, bt.RunSpec]:
    """The optimizers at their centre rates; the budget covers warm-up and rounds."""
    steps = 1 + args.warmup_steps + args.rounds * args.round_steps
    common = dict(num_steps=steps, **bt.regime(args))
    rates = bt.BASE_LEARNING_RATES
    runs = {
        "adam": bt.first_order("adam", rates["adam"], update_steps=args.update_steps, **common),
        "adagrad": bt.first_order(
            "adagrad", rates["adagrad"], update_steps=args.update_steps, **common
        ),
        "shampoo-async": bt.shampoo(
            "async", rates["shampoo"], update_steps=args.update_steps, **common
        ),
        "shampoo-sync": bt.shampoo(
            "sync", rates["shampoo"], update_steps=args.update_steps, **common
        ),
        "shampoo-in-graph": bt.shampoo(
            "async", rates["shampoo"], update_steps=args.update_steps, **common
        ),
        "shampoo-async-adaptive": bt.shampoo(
            "async", rates["shampoo"], update_steps=100, cadence="adaptive", **common
        ),
        "soap-async": bt.RunSpec(
            "soap", "async", rates["soap"], update_steps=10, cadence="adaptive", **common
        ),
        "soap-sync": bt.RunSpec("soap", "sync", rates["soap"], update_steps=10, **common),
        "soap-in-graph": bt.RunSpec("soap", "async", rates["soap"], update_steps=10, **common),
    }
    for period in filter(None, args.async_periods.split(",")):
        runs[f"shampoo-async-N{int(period)}"] = bt.shampoo(
            "async", rates["shampoo"], update_steps=int(period), **common
        )
    return runs


# Time their steps without service work, once they hold a root for every block.
IN_GRAPH = ("shampoo-in-graph", "soap-in-graph")
# The targets' optimizers and their limits (median step over Adam's).
LIMITS = {
    "shampoo-async": 1.10,
    "shampoo-in-graph": 1.10,
    "soap-async": 1.12,
    "soap-in-graph": 1.12,
}


def _hold_every_root(trainer, bridge, timeout_s: float = 300.0) -> None:
    """Steps `trainer` with its service until every block holds a root."""
    from trainer.optimizers.service_bridge import staleness

    deadline = time.monotonic() + timeout_s
    while staleness(trainer.optimizer).fraction_preconditioned < 1.0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every block got a root in {timeout_s:.0f} s")
        trainer.run_steps(bridge, 1)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.WARNING)
    runs = specs(args)
    if args.only:
        keep = {"adam", *args.only.split(",")}
        unknown = keep - set(runs)
        if unknown:
            raise SystemExit(f"--only names no run: {sorted(unknown)}; runs: {sorted(runs)}")
        runs = {label: spec for label, spec in runs.items() if label in keep}
    times: dict[str, list[float]] = {label: [] for label in runs}
    with contextlib.ExitStack() as stack:
        trainers, bridges = _build(runs, args, stack)
        for label, trainer in trainers.items():
            trainer.run_steps(bridges[label], 1)  # traces the loop
            for _ in range(args.warmup_steps):
                trainer.run_steps(bridges[label], 1)
            if label in IN_GRAPH:
                _hold_every_root(trainer, bridges[label])
                bridges[label] = None  # from now on: the step alone
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
            if label.startswith(("shampoo-async", "soap-async"))
        }

    summary = _summarise(times)
    met = {
        f"{label}: median step, ratio to Adam's": harness.target(
            summary[label]["median_ratio_to_adam"], f"<= {LIMITS.get(label, 1.10)}"
        )
        for label in summary
        if label.startswith(("shampoo-async", "soap")) or label in IN_GRAPH
    }
    bt.write_report(
        args.out,
        args,
        list(runs.values()),
        {
            "summary": summary,
            "async_staleness_at_end": final_staleness,
            "step_seconds": times,
        },
        script="scripts/bench_step_overhead.py",
        targets=met,
    )
    plot(times, Path(args.plot), args.round_steps)
    for label, row in summary.items():
        print(
            f"{label:14s} mean {row['mean_ms']:6.1f} ms (x{row['mean_ratio_to_adam']:.2f})  "
            f"median {row['median_ms']:6.1f} ms (x{row['median_ratio_to_adam']:.2f})  "
            f"max {row['max_ms']:6.0f} ms  standalone {_fmt(row['standalone_mean_ms'])} ms"
        )
    print("targets:", met)


def _build(runs: dict[str, bt.RunSpec], args: argparse.Namespace, stack: contextlib.ExitStack):
    """One Trainer per run, in fresh workdirs, and its service connection (None if none)."""
    from trainer.process_setup import setup_process
    from trainer.train import Trainer

    files, vocab_path = bt.shared_paths(args)
    # Every invocation times afresh, in workdirs of its own (earlier ones are left alone).
    parent = Path(args.work_dir) / "step_overhead"
    parent.mkdir(parents=True, exist_ok=True)
    session = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%S_"), dir=parent))
    log.info("workdirs under %s", session)
    trainers, bridges = {}, {}
    for label, spec in runs.items():
        workdir = str(session / label)
        config = bt.bench_config(spec, files, vocab_path)
        setup_process(config)
        trainer = Trainer(config, workdir)
        trainers[label] = trainer
        bridges[label] = stack.enter_context(trainer.preconditioning())
    return trainers, bridges


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
    summary = bt.convergence_results().get("summary", {})
    return {
        label: 1000 * row["mean_step_seconds"]
        for label, row in summary.items()
        if row.get("mean_step_seconds")
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def plot(times: dict[str, list[float]], path: Path, round_steps: int) -> None:
    """Each optimizer's step times in the order it ran them."""
    plt = harness.pyplot()
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
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
