"""Writes the README's results summary and docs/RESULTS.md from benchmarks/*.json, or checks them.

    python scripts/results.py            # regenerate both in place
    python scripts/results.py --check    # exit 1, naming the first figure that differs
    python scripts/results.py --fresh    # exit 1, naming each result older than its code

Every figure in the two documents is made here from a benchmark's JSON (the harness's
schema, scripts/harness.py): its numbers, and each target's threshold and the verdict
the benchmark computed, quoted and never recomputed. Every table names its JSON file,
the commit that produced it and the machine it ran on. `--fresh` compares each result's
code hash with the hash of the same sources now, and checks that its commit is clean and
an ancestor of HEAD.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

try:
    from scripts import harness
except ImportError:  # run as `python scripts/results.py`: scripts/ is on the path
    import harness

REPO_ROOT = harness.REPO_ROOT
README = "README.md"
RESULTS = "docs/RESULTS.md"
MARKER = "summary"

# Optimizers of the training tables, in order, with the names readers know them by.
OPTIMIZER_NAMES = {
    "adam": "Adam",
    "adam-b95": "Adam, β = (0.95, 0.95)",
    "adagrad": "AdaGrad",
    "shampoo-async": "Shampoo (roots), async",
    "shampoo-sync": "Shampoo (roots), sync",
    "shampoo-in-graph": "Shampoo (roots), step alone",
    "shampoo-async-adagrad-graft": "Shampoo (roots), async, AdaGrad graft",
    "soap-async": "Adam in Shampoo's eigenbasis, async adaptive",
    "soap-sync": "Adam in Shampoo's eigenbasis, sync, basis every 10",
    "soap-in-graph": "Adam in Shampoo's eigenbasis, step alone",
}


class ResultsError(Exception):
    """A benchmark file the documents cannot be made from."""


# ----------------------------------------------------------------- formatting


def _number(value: object, digits: int) -> str:
    if value is None or value == "inf" or isinstance(value, str):
        return "—"
    return f"{value:.{digits}f}"


def _ratio(value: object) -> str:
    return "not reached" if value is None else f"{value:.2f}×"


def _name(label: str) -> str:
    return OPTIMIZER_NAMES.get(label, label)


def machine(report: dict) -> str:
    """The machine a result came from, with its device/host split where it has one."""
    meta = report["metadata"]
    text = f"{meta.get('cpu_model') or 'unknown CPU'}, {meta.get('cpu_count', '?')} cores"
    split = meta.get("split") or {}
    if split.get("device_cpus"):
        text += f"; trainer on core {split['device_cpus']}, service on {split['host_cpus']}"
    return text


def source_line(path: str, report: dict) -> str:
    """The line under a table: its JSON (and the digest of its bytes), commit, machine, date.

    The digest makes any change to the file, even to a figure no table shows, a change
    to the documents, so `--check` catches it.
    """
    meta = report["metadata"]
    commit = (meta.get("git_commit") or "unknown")[:10]
    dirty = " (uncommitted changes)" if meta.get("git_dirty") else ""
    date = (meta.get("date") or "")[:10]
    return (
        f"From [{path}](../{path}) (sha256 `{report['digest'][:12]}`), commit `{commit}`{dirty}, "
        "code hash "
        f"`{(meta.get('code_hash') or '')[:12]}`, {machine(report)}, {date}: "
        f"`{meta.get('command', '')}`."
    )


def verdicts(targets: dict) -> list[str]:
    """Each target with its threshold, measured value and the verdict the run computed."""
    if not targets:
        return []
    lines = ["| target | threshold | measured | met |", "|---|---|---|---|"]
    for name, target in targets.items():
        verdict = "**yes**" if target["met"] else "**no**"
        cell = name.replace("|", "\\|")  # a bar would end the cell
        value = target["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        lines.append(f"| {cell} | {target['threshold']} | {shown} | {verdict} |")
    return lines


def targets_met(report: dict) -> str:
    targets = report.get("targets") or {}
    if not targets:
        return "—"
    met = sum(1 for row in targets.values() if row["met"])
    return f"{met} of {len(targets)}"


# ----------------------------------------------------------------- tables


def convergence_table(results: dict) -> list[str]:
    """Each optimizer's best run: loss, steps and time to Adam's best, step, BLEU; sweeps."""
    summary = results["summary"]
    lines = [
        "| optimizer | best lr | final dev loss | steps to Adam's best | wall time to it "
        "| mean step | test BLEU |",
        "|---|---|---|---|---|---|---|",
    ]
    adam_step = summary["adam"]["mean_step_seconds"]
    for label, row in summary.items():
        name = _name(label)
        config = results["best_runs"][label].get("optimizer_config", {})
        if label.startswith("soap"):
            statistics = config["shampoo"]["statistics_beta2"]
            name += f", β = ({config['beta1']:g}, {config['beta2']:g}), statistics {statistics:g}"
        step = row["mean_step_seconds"]
        lines.append(
            f"| {name} | {row['learning_rate']:g} | {_number(row['final_dev_loss'], 3)} "
            f"| {_ratio(row['steps_ratio_to_adam'])} | {_ratio(row['seconds_ratio_to_adam'])} "
            f"| {1000 * step:.0f} ms ({step / adam_step:.2f}×) "
            f"| {_number(row.get('test_bleu'), 1)} |"
        )
    rates = "; ".join(
        f"{_name(label)}: "
        + ", ".join(f"{r['learning_rate']:g} → {_number(r['final_dev_loss'], 3)}" for r in runs)
        for label, runs in results["sweeps"].items()
    )
    return [*lines, "", f"Learning-rate sweeps (final dev loss): {rates}."]


def convergence_headline(results: dict) -> str:
    summary = results["summary"]
    parts = [f"Adam's final dev loss {summary['adam']['final_dev_loss']:.3f}"]
    for label in ("shampoo-async", "soap-async"):
        row = summary.get(label)
        if row:
            parts.append(
                f"{_name(label)} {_number(row['final_dev_loss'], 3)}, "
                f"{_ratio(row['steps_ratio_to_adam'])} the steps and "
                f"{_ratio(row['seconds_ratio_to_adam'])} the wall time to Adam's best"
            )
    return "; ".join(parts)


def step_overhead_table(results: dict) -> list[str]:
    lines = ["| run | median step | mean step | p95 |", "|---|---|---|---|"]
    for label, row in results["summary"].items():
        lines.append(
            f"| {_name(label)} | {row['median_ms']:.0f} ms ({row['median_ratio_to_adam']:.2f}×) "
            f"| {row['mean_ms']:.0f} ms ({row['mean_ratio_to_adam']:.2f}×) "
            f"| {row['p95_ms']:.0f} ms |"
        )
    return lines


def step_overhead_headline(results: dict) -> str:
    return "median step over Adam's: " + ", ".join(
        f"{label} {row['median_ratio_to_adam']:.2f}×"
        for label, row in results["summary"].items()
        if label != "adam"
    )


def staleness_table(results: dict) -> list[str]:
    lines = [
        "| N | final dev loss | staleness mean / max (updates) | steps to Adam's best |",
        "|---|---|---|---|",
    ]
    for row in results["periods"]:
        staleness = f"{_number(row['staleness_mean'], 1)} / {_number(row['staleness_max'], 0)}"
        lines.append(
            f"| {row['period']} | {_number(row['final_dev_loss'], 3)} | {staleness} "
            f"| {_ratio(row.get('steps_ratio_to_adam'))} |"
        )
    return [*lines, "", f"Learning rate {results['learning_rate']:g}."]


def staleness_headline(results: dict) -> str:
    return "final dev loss by period N: " + ", ".join(
        f"{row['period']}: {_number(row['final_dev_loss'], 3)}" for row in results["periods"]
    )


def lr_tolerance_table(results: dict) -> list[str]:
    lines = ["| optimizer | learning rates → final dev loss | spread |", "|---|---|---|"]
    for label, row in results["optimizers"].items():
        runs = ", ".join(
            f"{r['learning_rate']:g} → {_number(r['final_dev_loss'], 3)}" for r in row["runs"]
        )
        lines.append(f"| {_name(label)} | {runs} | {_number(row['spread'], 3)} |")
    return lines


def lr_tolerance_headline(results: dict) -> str:
    return "final dev loss spread over the rates: " + ", ".join(
        f"{_name(label)} {_number(row['spread'], 3)}"
        for label, row in results["optimizers"].items()
    )


def ablation_table(results: dict) -> list[str]:
    lines = [
        "| variant | best dev loss | final dev loss | steps to Adam's best |",
        "|---|---|---|---|",
    ]
    for name, row in results["variants"].items():
        lines.append(
            f"| {name} | {_number(row['best_dev_loss'], 3)} | {_number(row['final_dev_loss'], 3)} "
            f"| {_ratio(row['steps_ratio_to_adam'])} |"
        )
    return [*lines, "", f"Adam's best dev loss {results['adam_best_dev_loss']:.3f}."]


def ablation_headline(results: dict) -> str:
    best = results["lowest_best_dev_loss"]
    row = results["variants"][best]
    return f"lowest best dev loss: {best} ({row['best_dev_loss']:.3f})"


def delay_table(results: dict) -> list[str]:
    lines = ["| delay D | final dev loss | mean step | waiting |", "|---|---|---|---|"]
    for row in results["delays"]:
        lines.append(
            f"| {row['delay_steps']} | {_number(row['final_dev_loss'], 3)} "
            f"| {1000 * row['mean_step_seconds']:.0f} ms | {100 * row['wait_fraction']:.1f}% |"
        )
    return lines


def delay_headline(results: dict) -> str:
    return "time spent waiting for roots: " + ", ".join(
        f"D={row['delay_steps']}: {100 * row['wait_fraction']:.1f}%" for row in results["delays"]
    )


def eigenbasis_table(results: dict) -> list[str]:
    lines = [
        "| n | eigh | QR step | off-diagonal left: eigh / QR step / stale basis |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['n']} | {1000 * row['eigh_seconds']:.1f} ms "
            f"| {1000 * row['qr_step_seconds']:.1f} ms "
            f"| {row['off_diagonal_eigh']:.0e} / {row['off_diagonal_qr_step']:.2f} / "
            f"{row['off_diagonal_stale']:.2f} |"
        )
    big = results.get("big_model_refresh")
    if big:
        lines += [
            "",
            f"Big's {big['statistics']:,} statistics on {big['host_cores']} workers: "
            f"{big['refresh_seconds']:.1f} s of eigh per full refresh.",
        ]
    return lines


def eigenbasis_headline(results: dict) -> str:
    row = next((r for r in results["rows"] if r["n"] == 128), results["rows"][0])
    return (
        f"n = {row['n']}: eigh {1000 * row['eigh_seconds']:.1f} ms, one QR step "
        f"{1000 * row['qr_step_seconds']:.1f} ms"
    )


def roots_table(results: dict) -> list[str]:
    lines = [
        "| threads | n | condition | method | time (median) | iterations | distance to eigh |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["cases"]:
        lines.append(
            f"| {row['threads']} | {row['n']} | {row['condition']:.0e} | {row['method']} "
            f"| {1000 * row['seconds']:.1f} ms | {row.get('iterations') or '—'} "
            f"| {_sci(row.get('relative_distance_to_eigh'))} |"
        )
    return lines


def _sci(value: object) -> str:
    return "—" if not isinstance(value, float) else f"{value:.1e}"


def roots_headline(results: dict) -> str:
    cases = [r for r in results["cases"] if r["method"] == "schur_newton" and r["threads"] == 1]
    if not cases:
        return "see docs/RESULTS.md"
    big = max(r["n"] for r in cases)
    slowest = max((r for r in cases if r["n"] == big), key=lambda r: r["seconds"])
    return f"Schur–Newton at n = {big}, one thread: {1000 * slowest['seconds']:.0f} ms at most"


def service_table(results: dict) -> list[str]:
    lines = [
        "| n | bare solver | in a worker | push to publish | push to client "
        "| gRPC path over bare |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["latency"]:
        lines.append(
            f"| {row['n']} | {1000 * row['bare_solver_s']:.1f} ms "
            f"| {1000 * row['worker_solver_s']:.1f} ms | {1000 * row['push_to_publish_s']:.1f} ms "
            f"| {1000 * row['push_to_client_s']:.1f} ms | {row['grpc_overhead']:.2f}× |"
        )
    lines += ["", "| workers | blocks | blocks/s | speedup | efficiency |", "|---|---|---|---|---|"]
    for row in results["throughput"]:
        lines.append(
            f"| {row['workers']} | {row['blocks']} | {row['blocks_per_s']:.1f} "
            f"| {row['speedup']:.2f} | {row['efficiency']:.2f} |"
        )
    lines += ["", "| block side | client push | raw stub push |", "|---|---|---|"]
    for row in results["wire"]:
        lines.append(
            f"| {row['n']} | {row['client_mb_per_s']:.0f} MB/s "
            f"| {row['raw_stub_mb_per_s']:.0f} MB/s |"
        )
    return lines


def service_headline(results: dict) -> str:
    top = results["throughput"][-1]
    wire = ", ".join(f"{r['client_mb_per_s']:.0f} MB/s at n = {r['n']}" for r in results["wire"])
    return (
        f"{top['workers']} workers at n = {results['throughput_n']}: "
        f"{top['blocks_per_s']:.1f} blocks/s, efficiency {top['efficiency']:.2f}; pushes {wire}"
    )


def shards_table(results: dict) -> list[str]:
    lines = [
        "| shards × workers | processes | blocks/s | speedup | efficiency |",
        "|---|---|---|---|---|",
    ]
    for row in results["configurations"]:
        lines.append(
            f"| {row['shards']} × {row['workers_per_shard']} | {row['processes']} "
            f"| {row['blocks_per_second']:.1f} | {row['speedup']:.2f} | {row['efficiency']:.2f} |"
        )
    config = results.get("config", {})
    return [
        *lines,
        "",
        f"Statistics of {config.get('n')} × {config.get('n')}, "
        f"{config.get('blocks')} per round, {config.get('rounds')} rounds.",
    ]


def shards_headline(results: dict) -> str:
    return "scaling efficiency: " + ", ".join(
        f"{r['shards']}×{r['workers_per_shard']}: {r['efficiency']:.2f}"
        for r in results["configurations"]
    )


def push_burst_table(results: dict) -> list[str]:
    lines = [
        "| pushes | accepted / refused | tree memory start → peak | slowest health answer |",
        "|---|---|---|---|",
    ]
    for kind in ("chunked", "whole"):
        row = results.get(kind)
        if not row:
            continue
        outcomes = ", ".join(f"{key} {value}" for key, value in row["outcomes"].items())
        lines.append(
            f"| {kind} | {outcomes} | {row['tree_rss_start_mb']} → {row['tree_rss_peak_mb']} MiB "
            f"| {row['health_latency_max_s']:.2f} s |"
        )
    return [
        *lines,
        "",
        f"{results['pushes']} concurrent pushes of {results['push_mib']} MiB each "
        f"(service flags {' '.join(results['service_flags'])}).",
    ]


def push_burst_headline(results: dict) -> str:
    row = results["chunked"]
    return (
        f"{results['pushes']} × {results['push_mib']} MiB chunked pushes: service tree peak "
        f"{row['tree_rss_peak_mb']} MiB"
    )


def chaos_table(results: dict) -> list[str]:
    lines = [
        "| run | finished at step | final dev loss | dev BLEU | trainer kills | service kills "
        "| steps trained again | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("undisturbed", "chaotic"):
        row = results[kind]
        lines.append(
            f"| {kind} | {row['step']} | {_number(row['dev_loss'], 3)} "
            f"| {_number(row['dev_bleu'], 1)} | {len(row['trainer_kills'])} "
            f"| {len(row['service_outages'])} | {row['steps_trained_again']} "
            f"| {row['wall_s']:.0f} s |"
        )
    return [*lines, "", f"{results['steps']} steps, seed {results['seed']}."]


def chaos_headline(results: dict) -> str:
    row, calm = results["chaotic"], results["undisturbed"]
    return (
        f"{len(row['trainer_kills'])} trainer and {len(row['service_outages'])} service kills: "
        f"dev loss {_number(row['dev_loss'], 3)} against {_number(calm['dev_loss'], 3)} undisturbed"
    )


def chaos_hostile_table(results: dict) -> list[str]:
    memory = results["service_rss_mb"]
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| steps finished / lost | {results['finished_step']} / {results['steps_lost']} |",
        f"| longest gap between progress lines | {results['longest_progress_gap_s']:.2f} s |",
        f"| service tree memory start / peak / end | {memory['start']} / {memory['peak']} / "
        f"{memory['end']} MiB (budget {results['memory_budget_mb']}) |",
        f"| health checks / unanswered | {results['health_checks']} / "
        f"{len(results['health_failures'])} |",
        f"| slowest health answer | {results['health_latency_s']['max']:.2f} s |",
        f"| large pushes declared | {results['large_pushes_declared']} |",
    ]
    for key, value in results.get("hostile", {}).items():
        lines.append(f"| hostile: {key} | {value} |")
    return lines


def chaos_hostile_headline(results: dict) -> str:
    return (
        f"{results['steps_lost']} steps lost under hostile clients; service tree peak "
        f"{results['service_rss_mb']['peak']:.0f} MiB (budget {results['memory_budget_mb']} MiB "
        "+ 400 allowed)"
    )


def distribution_table(results: dict) -> list[str]:
    lines = [
        "| configuration | processes | replicas | median step | train loss | dev loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["configurations"]:
        lines.append(
            f"| {row['configuration']} | {row['processes']} | {row['replicas']} "
            f"| {row['step_ms_median']:.0f} ms | {row['train_loss']:.3f} | {row['dev_loss']:.3f} |"
        )
    return [*lines, "", results.get("note", "")]


def distribution_headline(results: dict) -> str:
    return "dev loss: " + ", ".join(
        f"{r['configuration']} {r['dev_loss']:.3f}" for r in results["configurations"]
    )


def input_table(results: dict) -> list[str]:
    return [
        "| batches/s | examples/s | tokens/s | padding | first batch |",
        "|---|---|---|---|---|",
        f"| {results['batches_per_s']:.0f} | {results['examples_per_s']:,.0f} "
        f"| {results['tokens_per_s']:,.0f} | {100 * results['padding_fraction']:.1f}% "
        f"| {results['first_batch_seconds']:.2f} s |",
    ]


def input_headline(results: dict) -> str:
    return f"{results['tokens_per_s']:,.0f} non-pad tokens/s out of the input pipeline"


def scalars(results: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, object]]:
    """The scalar figures of a result, flattened to dotted names (lists left out)."""
    rows: list[tuple[str, object]] = []
    for key, value in results.items():
        if key == "config":  # the JSON keeps it; the documents show figures
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < 2:
            rows += scalars(value, f"{name}.", depth + 1)
        elif isinstance(value, bool | int | float | str) or value is None:
            rows.append((name, value))
    return rows


def generic_table(results: dict) -> list[str]:
    """A result's scalar figures, for benchmarks without a table of their own."""
    rows = scalars(results)
    if not rows:
        return []
    lines = ["| figure | value |", "|---|---|"]
    for name, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown.replace('|', '/')} |")
    return lines


# Benchmark name -> (title, what it measures, table, headline). Order of the documents.
Section = tuple[str, str, Callable[[dict], list[str]], Callable[[dict], str] | None]
SECTIONS: dict[str, Section] = {
    "convergence": (
        "Adam, Shampoo and Adam in Shampoo's eigenbasis on Tatoeba En–Fr",
        "Each optimizer's learning-rate sweep of 1000 steps; the best rate by final dev loss, "
        "its steps and wall time to Adam's best dev loss, and test BLEU (greedy).",
        convergence_table,
        convergence_headline,
    ),
    "step_overhead": (
        "Step time against Adam's",
        "The optimizers' trainers interleaved in one process, step by step.",
        step_overhead_table,
        step_overhead_headline,
    ),
    "staleness": (
        "Root staleness: Shampoo against its update period N",
        "Async Shampoo at its best rate, roots requested every N steps.",
        staleness_table,
        staleness_headline,
    ),
    "staleness_soap": (
        "Basis staleness: Adam in Shampoo's eigenbasis against its update period N",
        "Async eigenbasis optimizer at its best rate, bases requested every N steps.",
        staleness_table,
        staleness_headline,
    ),
    "lr_tolerance": (
        "Learning-rate tolerance",
        "Final dev loss over a range of rates around each optimizer's best.",
        lr_tolerance_table,
        lr_tolerance_headline,
    ),
    "ablation": (
        "Shampoo's update choices",
        "Grafting scope, momentum form, statistics sums and ridge, one at a time.",
        ablation_table,
        ablation_headline,
    ),
    "delay": (
        "Fixed root delay",
        "Async Shampoo with roots installed exactly D steps after their statistics.",
        delay_table,
        delay_headline,
    ),
    "eigenbasis": (
        "How the service computes eigenbases",
        "Full float64 eigh against one warm-started QR step, one BLAS thread.",
        eigenbasis_table,
        eigenbasis_headline,
    ),
    "roots": (
        "Inverse p-th roots in float64",
        "Coupled Schur–Newton against eigh-based roots, by size, condition and BLAS threads.",
        roots_table,
        roots_headline,
    ),
    "service": (
        "The preconditioner service",
        "Latency of one root through the service, worker scaling, and push throughput.",
        service_table,
        service_headline,
    ),
    "shards": (
        "Sharded service",
        "Roots per second with the statistics spread over S services of W workers.",
        shards_table,
        shards_headline,
    ),
    "push_burst": (
        "A burst of large pushes",
        "Concurrent 32 MiB pushes against a 512 MiB budget: memory and health.",
        push_burst_table,
        push_burst_headline,
    ),
    "chaos": (
        "Killing the trainer and the service",
        "A short async job whose processes are SIGKILLed at random, against the same job "
        "undisturbed.",
        chaos_table,
        chaos_headline,
    ),
    "chaos_hostile": (
        "Hostile clients",
        "Training against a service that floods, idle streams, unread pulls and large "
        "pushes hit at once.",
        chaos_hostile_table,
        chaos_hostile_headline,
    ),
    "chaos_hostile_declared": (
        "Hostile clients declaring their large pushes",
        "The same, with the large pushes declaring their size as the client does.",
        chaos_hostile_table,
        chaos_hostile_headline,
    ),
    "distribution": (
        "Data parallelism on a CPU",
        "The quickstart job with no strategy, MirroredStrategy and MultiWorkerMirroredStrategy: "
        "a correctness run, not a speed-up.",
        distribution_table,
        distribution_headline,
    ),
    "input_pipeline": (
        "Input pipeline",
        "Tokenize, filter and bucket Tatoeba En–Fr, one core.",
        input_table,
        input_headline,
    ),
}


def section_of(name: str) -> Section:
    return SECTIONS.get(name, (name.replace("_", " ").capitalize(), "", generic_table, None))


# ----------------------------------------------------------------- documents


def load(root: Path) -> dict[str, tuple[str, dict]]:
    """File stem -> (path, report) of every benchmarks/*.json, in the documents' order."""
    reports: dict[str, tuple[str, dict]] = {}
    for path in sorted((root / "benchmarks").glob("*.json")):
        relative = path.relative_to(root).as_posix()
        data = path.read_bytes()
        report = json.loads(data)
        if report.get("schema") != harness.SCHEMA or "metadata" not in report:
            raise ResultsError(
                f"{relative} is not a harness result (schema {harness.SCHEMA}); re-run its "
                "benchmark, or move it to docs/history/ with its commit"
            )
        report["digest"] = hashlib.sha256(data).hexdigest()
        reports[path.stem] = (relative, report)
    order = [name for name in SECTIONS if name in reports]
    order += sorted(name for name in reports if name not in SECTIONS)
    return {name: reports[name] for name in order}


def results_document(reports: dict[str, tuple[str, dict]]) -> str:
    """docs/RESULTS.md: every benchmark's tables, targets and source line."""
    lines = [
        "# Results",
        "",
        "Generated by `python scripts/results.py` from benchmarks/*.json; do not edit by hand.",
        "Each section names the JSON it comes from, the commit and code hash that produced it",
        "and the machine it ran on. Verdicts are the ones each benchmark computed.",
        "docs/REPRODUCING.md has the commands.",
    ]
    for name, (path, report) in reports.items():
        title, what, table, _ = section_of(name)
        lines += ["", f"## {title}", ""]
        if what:
            lines += [what, ""]
        body = table(report["results"])
        if body:
            lines += [*body, ""]
        marks = verdicts(report.get("targets") or {})
        if marks:
            lines += [*marks, ""]
        lines.append(source_line(path, report))
    return "\n".join(lines) + "\n"


def summary_table(reports: dict[str, tuple[str, dict]]) -> str:
    """The README's table: one line per benchmark, its headline, verdicts and source."""
    lines = ["| benchmark | result | targets met | from |", "|---|---|---|---|"]
    for name, (path, report) in reports.items():
        title, _, _, headline = section_of(name)
        text = headline(report["results"]) if headline else "see docs/RESULTS.md"
        commit = (report["metadata"].get("git_commit") or "unknown")[:7]
        lines.append(
            f"| {title} | {text} | {targets_met(report)} "
            f"| [{Path(path).name}]({path}), `{commit}`, {machine(report)} |"
        )
    return "\n".join(lines)


def render_readme(text: str, summary: str) -> str:
    pattern = re.compile(
        rf"(<!-- results:{MARKER} -->\n)(?:.*?\n)?(<!-- /results:{MARKER} -->)", re.DOTALL
    )
    if not pattern.search(text):
        raise ResultsError(f"{README} has no <!-- results:{MARKER} --> markers")
    return pattern.sub(lambda m: f"{m.group(1)}{summary}\n{m.group(2)}", text)


def first_difference(name: str, old: str, new: str) -> str | None:
    """The first line that differs between two versions of a document, or None."""
    for number, (a, b) in enumerate(zip(old.splitlines(), new.splitlines()), start=1):
        if a != b:
            return f"{name} line {number}: has {a!r}, the JSON gives {b!r}"
    if old != new:
        return f"{name}: differs in length from what the JSON gives"
    return None


def documents(root: Path) -> dict[str, str]:
    """Path -> the text it must hold."""
    reports = load(root)
    readme = (root / README).read_text()
    return {
        README: render_readme(readme, summary_table(reports)),
        RESULTS: results_document(reports),
    }


def stale_reasons(report: dict, root: Path) -> list[str]:
    """Why a result does not describe the code at `root` now ([] when it does)."""
    meta = report["metadata"]
    reasons = []
    if meta.get("git_dirty") is not False:
        reasons.append("ran on uncommitted code")
    commit = meta.get("git_commit")
    ancestor = commit and subprocess.run(
        ["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=root, capture_output=True
    )
    if not ancestor or ancestor.returncode != 0:
        reasons.append(f"commit {commit} is not an ancestor of HEAD")
    if meta.get("code_hash") != harness.code_hash(meta.get("sources", []), root):
        reasons.append("its sources changed since it ran (code hash differs)")
    return reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is stale")
    parser.add_argument(
        "--fresh", action="store_true", help="exit 1 if a result is older than its code"
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository")
    args = parser.parse_args(argv)
    try:
        if args.fresh:
            return _fresh(args.root)
        wanted = documents(args.root)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        for name, text in wanted.items():
            path = args.root / name
            old = path.read_text() if path.is_file() else ""
            difference = first_difference(name, old, text)
            if difference:
                print(f"{difference}\nrun: python scripts/results.py", file=sys.stderr)
                return 1
        print(f"{README} and {RESULTS} match benchmarks/*.json")
        return 0
    for name, text in wanted.items():
        (args.root / name).write_text(text)
    print(f"regenerated {README} and {RESULTS}")
    return 0


def _fresh(root: Path) -> int:
    stale = 0
    for path, report in load(root).values():
        reasons = stale_reasons(report, root)
        stale += bool(reasons)
        print(f"{path}: {'; '.join(reasons) if reasons else 'current'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
