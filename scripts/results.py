"""Writes the generated results tables into README.md from benchmarks/*.json, or checks them.

    python scripts/results.py            # regenerate every table in place
    python scripts/results.py --check    # exit 1, naming the first table that differs

Each table sits in README.md between `<!-- results:NAME -->` and `<!-- /results:NAME -->`
and is made only from its JSON file: the figures, and each target's threshold and the
verdict the benchmark computed (quoted, never recomputed here). Every table names its
JSON file, the commit that produced it and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Optimizers of the convergence table, in order, with the names readers know them by.
CONVERGENCE_ROWS = {
    "adam": "Adam",
    "adam-b95": "Adam, β = (0.95, 0.95)",
    "adagrad": "AdaGrad",
    "shampoo-async": "Shampoo (roots), async",
    "shampoo-sync": "Shampoo (roots), sync",
    "soap-async": "Adam in Shampoo's eigenbasis, async adaptive",
    "soap-sync": "Adam in Shampoo's eigenbasis, sync, basis every 10",
}


def _source(path: str, report: dict) -> str:
    """The line under a table: its JSON, commit and machine."""
    meta = report.get("metadata", {})
    commit = (meta.get("git_commit") or "unknown")[:10]
    dirty = " (uncommitted changes)" if meta.get("git_dirty") else ""
    machine = f"{meta.get('cpu_model', 'unknown CPU')}, {meta.get('cpu_count', '?')} cores"
    date = (meta.get("date") or "")[:10]
    return f"From [{path}]({path}), commit `{commit}`{dirty}, {machine}, {date}."


def _number(value: object, digits: int) -> str:
    if value is None or value == "inf":
        return "—"
    return f"{value:.{digits}f}"


def _ratio(value: object) -> str:
    return "not reached" if value is None else f"{value:.2f}×"


def _betas(optimizer: dict) -> str:
    """ ", β = (b1, b2), statistics b" of a run's resolved optimizer config."""
    statistics = optimizer["shampoo"]["statistics_beta2"]
    return f", β = ({optimizer['beta1']:g}, {optimizer['beta2']:g}), statistics {statistics:g}"


def convergence_table(report: dict, path: str) -> str:
    """Adam, root Shampoo and eigenbasis Shampoo side by side, and the targets' verdicts."""
    summary = report["summary"]
    lines = [
        "| optimizer | best lr | final dev loss | steps to Adam's best | wall time to it "
        "| mean step | test BLEU |",
        "|---|---|---|---|---|---|---|",
    ]
    adam_step = summary["adam"]["mean_step_seconds"]
    for label, name in CONVERGENCE_ROWS.items():
        row = summary.get(label)
        if row is None:
            continue
        if label.startswith("soap"):
            name += _betas(report["best_runs"][label]["optimizer_config"])
        step = row["mean_step_seconds"]
        lines.append(
            f"| {name} | {row['learning_rate']:g} | {_number(row['final_dev_loss'], 3)} "
            f"| {_ratio(row['steps_ratio_to_adam'])} | {_ratio(row['seconds_ratio_to_adam'])} "
            f"| {1000 * step:.0f} ms ({step / adam_step:.2f}×) "
            f"| {_number(row.get('test_bleu'), 1)} |"
        )
    lines.append("")
    sweeps = report.get("sweeps", {})
    rates = "; ".join(
        f"{CONVERGENCE_ROWS.get(label, label)}: "
        + ", ".join(
            f"{run['learning_rate']:g} → {_number(run['final_dev_loss'], 3)}" for run in runs
        )
        for label, runs in sweeps.items()
    )
    lines.append(f"Learning-rate sweeps (final dev loss): {rates}.")
    targets = report.get("targets", {})
    if targets:
        lines += ["", "Targets of async Adam in Shampoo's eigenbasis:", "", *_verdicts(targets)]
    lines += ["", _source(path, report)]
    return "\n".join(lines)


def _verdicts(targets: dict) -> list[str]:
    """Each target with its threshold, measured value and the verdict the run computed."""
    lines = ["| target | threshold | measured | met |", "|---|---|---|---|"]
    for name, target in targets.items():
        verdict = "**yes**" if target["met"] else "**no**"
        cell = name.replace("|", "\\|")  # a bar would end the cell
        lines.append(
            f"| {cell} | {target['threshold']} | {_number(target['value'], 3)} | {verdict} |"
        )
    return lines


def step_overhead_table(report: dict, path: str) -> str:
    """Median and mean step of each optimizer, interleaved in one process, against Adam's."""
    lines = ["| run | median step | mean step | p95 |", "|---|---|---|---|"]
    for label, row in report["summary"].items():
        lines.append(
            f"| {label} | {row['median_ms']:.0f} ms ({row['median_ratio_to_adam']:.2f}×) "
            f"| {row['mean_ms']:.0f} ms ({row['mean_ratio_to_adam']:.2f}×) "
            f"| {row['p95_ms']:.0f} ms |"
        )
    return "\n".join([*lines, "", *_verdicts(report["target"]), "", _source(path, report)])


def staleness_table(report: dict, path: str) -> str:
    """Final dev loss, staleness and steps to Adam's best against the update period N."""
    lines = [
        "| N | final dev loss | staleness mean / max (updates) | steps to Adam's best |",
        "|---|---|---|---|",
    ]
    for row in report["results"]:
        staleness = f"{_number(row['staleness_mean'], 1)} / {_number(row['staleness_max'], 0)}"
        lines.append(
            f"| {row['period']} | {_number(row['final_dev_loss'], 3)} | {staleness} "
            f"| {_ratio(row.get('steps_ratio_to_adam'))} |"
        )
    lines += ["", f"Learning rate {report['learning_rate']:g}.", "", _source(path, report)]
    return "\n".join(lines)


def eigenbasis_table(report: dict, path: str) -> str:
    """Full eigh against one warm-started QR step, time and quality, per matrix side."""
    lines = [
        "| n | eigh | QR step | off-diagonal left: eigh / QR step / stale basis |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['n']} | {1000 * row['eigh_seconds']:.1f} ms "
            f"| {1000 * row['qr_step_seconds']:.1f} ms "
            f"| {row['off_diagonal_eigh']:.0e} / {row['off_diagonal_qr_step']:.2f} / "
            f"{row['off_diagonal_stale']:.2f} |"
        )
    big = report.get("big_model_refresh")
    if big:
        lines += [
            "",
            f"Big's {big['statistics']:,} statistics on {big['host_cores']} workers: "
            f"{big['refresh_seconds']:.1f} s of eigh per full refresh.",
        ]
    return "\n".join([*lines, "", _source(path, report)])


# Table name -> (JSON file, function making the table's Markdown from it).
TABLES: dict[str, tuple[str, Callable[[dict, str], str]]] = {
    "convergence": ("benchmarks/convergence.json", convergence_table),
    "soap_betas": ("benchmarks/soap_betas.json", convergence_table),
    "step_overhead": ("benchmarks/step_overhead.json", step_overhead_table),
    "staleness_soap": ("benchmarks/staleness_soap.json", staleness_table),
    "eigenbasis": ("benchmarks/eigenbasis.json", eigenbasis_table),
}


def render(text: str, root: Path = REPO_ROOT) -> str:
    """`text` with every table whose markers it holds regenerated from its JSON under `root`."""
    for name, (path, make) in TABLES.items():
        pattern = re.compile(
            rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.DOTALL
        )
        if not pattern.search(text):
            continue
        report = json.loads((root / path).read_text())
        table = make(report, path)
        text = pattern.sub(lambda m, table=table: f"{m.group(1)}{table}\n{m.group(2)}", text)
    return text


def first_difference(old: str, new: str) -> str | None:
    """The first line that differs between two versions of the README, or None."""
    for number, (a, b) in enumerate(zip(old.splitlines(), new.splitlines()), start=1):
        if a != b:
            return f"README.md line {number}: has {a!r}, the JSON gives {b!r}"
    if old != new:
        return "README.md: the generated tables differ in length from what the JSON gives"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository")
    args = parser.parse_args(argv)
    readme = args.root / "README.md"
    old = readme.read_text()
    new = render(old, args.root)
    if args.check:
        difference = first_difference(old, new)
        if difference:
            print(f"{difference}\nrun: python scripts/results.py", file=sys.stderr)
            return 1
        print("README.md tables match benchmarks/*.json")
        return 0
    readme.write_text(new)
    print("README.md tables regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
