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
        lines += [
            "",
            "| target (async eigenbasis) | threshold | measured | met |",
            "|---|---|---|---|",
        ]
        for name, target in targets.items():
            verdict = "**yes**" if target["met"] else "**no**"
            lines.append(
                f"| {name} | {target['threshold']} | {_number(target['value'], 3)} | {verdict} |"
            )
    lines += ["", _source(path, report)]
    return "\n".join(lines)


# Table name -> (JSON file, function making the table's Markdown from it).
TABLES: dict[str, tuple[str, Callable[[dict, str], str]]] = {
    "convergence": ("benchmarks/convergence.json", convergence_table),
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
