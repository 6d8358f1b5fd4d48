"""Benchmark of the inverse p-th root solvers in `precond_service.common.roots`.

Times, in float64 on the CPU, for symmetric PSD matrices with log-spaced eigenvalues:

* `schur_newton`: the production method (dynamic scaling), through `inverse_pth_root`;
* `schur_newton_plain`: the same with `scaling="none"` (Higham's unscaled iteration);
* `eigh`: `inverse_pth_root(method="eigh")`, which also computes its residual;
* `eigh_bare`: `np.linalg.eigh` plus `V·diag(λ^(-1/p))·Vᵀ` only, the baseline the
  ratio target refers to (and the reference root for the distances);
* `svd`: the same root from `np.linalg.svd`.

The two `inverse_pth_root` methods include validation and the power iteration for λmax;
the bare baselines use the ridge it produced. Each BLAS thread setting runs in its own
subprocess, with OPENBLAS/OMP/MKL_NUM_THREADS set before NumPy is imported.

The targets: Schur–Newton within 5x of `eigh_bare` at n = 1024 on one BLAS thread, and
its root within a relative Frobenius distance of 1e-6 of the reference at every size.

    python -m scripts.bench_roots              # full run (several minutes)
    python -m scripts.bench_roots --quick      # smoke run (seconds), to /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The worker's BLAS thread count comes from the environment its parent gives it, read
# when NumPy loads; the parent itself does no BLAS work.
import numpy as np

from precond_service.common import roots
from scripts import harness

SOURCES = (*harness.COMMON, "scripts/bench_roots.py")
# Schur–Newton's time over eigh_bare's at this size, on one BLAS thread, at most RATIO_LIMIT;
# its root's relative distance to eigh_bare's at most DISTANCE_LIMIT at every size.
RATIO_SIZE, RATIO_LIMIT, DISTANCE_LIMIT = 1024, 5.0, 1e-6
METHOD_NAMES = ("schur_newton", "schur_newton_plain", "eigh", "eigh_bare", "svd")
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="128,256,512,1024,2048", help="comma-separated matrix sizes n"
    )
    parser.add_argument("--conds", default="1e2,1e4,1e6", help="comma-separated condition numbers")
    parser.add_argument("--p", type=int, default=4, help="root exponent")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated BLAS thread counts (default: 1 and all cores)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON output path (default benchmarks/roots.json)"
    )
    parser.add_argument(
        "--plot", default=None, help="PNG output path (default benchmarks/roots.png)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small sizes, two conditions, one repeat; writes to "
        "the temporary directory unless --out/--plot are given",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # A smoke run must not overwrite the real results in benchmarks/.
    default_stem = (
        Path(tempfile.gettempdir()) / "bench_roots_quick"
        if args.quick
        else Path("benchmarks") / "roots"
    )
    args.out = args.out or str(default_stem.with_suffix(".json"))
    args.plot = args.plot or str(default_stem.with_suffix(".png"))
    if args.quick:
        args.sizes, args.conds, args.repeats = "64,128", "1e2,1e6", 1
    return args


def main(argv: list[str] | None = None) -> None:
    """Runs one subprocess per thread setting, then writes JSON, table and plot."""
    args = parse_args(argv)
    if args.worker:
        load_before = os.getloadavg()
        rows = run_cases(args)
        print(json.dumps({"rows": rows, "load_before": load_before, "load_after": os.getloadavg()}))
        return
    cores = len(os.sched_getaffinity(0))
    thread_counts = (
        [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    )
    rows, load = [], {}
    for threads in thread_counts:
        env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
        command = [
            sys.executable,
            "-m",
            "scripts.bench_roots",
            "--worker",
            "--sizes",
            args.sizes,
            "--conds",
            args.conds,
            "--p",
            str(args.p),
            "--repeats",
            str(args.repeats),
        ]
        print(f"running {threads} BLAS thread(s) ...", file=sys.stderr, flush=True)
        output = subprocess.run(
            command, env=env, check=True, capture_output=True, text=True, cwd=harness.REPO_ROOT
        ).stdout
        worker = json.loads(output)
        rows.extend({"threads": threads, **row} for row in worker["rows"])
        # Other processes on the machine skew the timings; the load average shows it.
        load[threads] = {
            "1/5/15 min before": worker["load_before"],
            "1/5/15 min after": worker["load_after"],
        }
    verdicts = targets(rows)
    harness.write(
        args.out,
        benchmark="roots",
        sources=SOURCES,
        results={
            "p": args.p,
            "repeats": args.repeats,
            "cores": cores,
            "load_average": load,
            "cases": rows,
        },
        targets=verdicts,
        split=None,
    )
    print_table(rows)
    plot(rows, args.plot, args.p)
    for name, row in verdicts.items():
        print(f"target {name}: {row}")
    print(f"wrote {args.out} and {args.plot}")


def targets(rows: list[dict]) -> dict[str, dict]:
    """Schur–Newton's speed against eigh_bare at n = 1024 (one thread) and its accuracy.

    The speed target is left out where the run has no n = 1024 on one thread (`--quick`).
    """
    newton = [r for r in rows if r["method"] == "schur_newton"]
    found = {}
    timed = [r["ratio_to_eigh_bare"] for r in newton if (r["n"], r["threads"]) == (RATIO_SIZE, 1)]
    if timed:
        found[
            f"Schur–Newton's time over eigh_bare's at n = {RATIO_SIZE}, one BLAS thread, "
            "largest over the condition numbers"
        ] = harness.target(max(timed), f"<= {RATIO_LIMIT:g}")
    found["Schur–Newton's root: relative Frobenius distance to eigh_bare's, largest"] = (
        harness.target(
            max(r["relative_distance_to_eigh"] for r in newton), f"<= {DISTANCE_LIMIT:g}"
        )
    )
    return found


def run_cases(args: argparse.Namespace) -> list[dict]:
    """Times every method on every (n, condition number); runs inside the worker."""
    rows = []
    for n in [int(size) for size in args.sizes.split(",")]:
        for condition in [float(c) for c in args.conds.split(",")]:
            rng = np.random.default_rng(n)
            orthogonal, _ = np.linalg.qr(rng.standard_normal((n, n)))
            matrix = (orthogonal * np.geomspace(1.0, 1.0 / condition, n)) @ orthogonal.T
            matrix = 0.5 * (matrix + matrix.T)
            ridge = 1e-6 * roots.estimate_max_eigenvalue(matrix)
            damped = matrix + ridge * np.eye(n)
            solvers = {
                "schur_newton": lambda m=matrix: roots.inverse_pth_root(m, args.p),
                "schur_newton_plain": lambda m=matrix: roots.inverse_pth_root(
                    m, args.p, scaling="none"
                ),
                "eigh": lambda m=matrix: roots.inverse_pth_root(m, args.p, method="eigh"),
                "eigh_bare": lambda d=damped: eigh_root(d, args.p),
                "svd": lambda d=damped: svd_root(d, args.p),
            }
            # Methods take turns within each repeat, so that a burst of load from other
            # processes falls on all of them. CPU seconds over wall seconds shows such
            # load: about the thread count when the machine is otherwise idle.
            times = {name: [] for name in solvers}
            cpu_times = {name: [] for name in solvers}
            outcomes = {}
            for _ in range(args.repeats):
                for name, solve in solvers.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    outcomes[name] = solve()
                    times[name].append(time.perf_counter() - wall)
                    cpu_times[name].append(time.process_time() - cpu)
            reference = outcomes["eigh_bare"]
            medians = {name: statistics.median(values) for name, values in times.items()}
            for name, outcome in outcomes.items():
                if isinstance(outcome, roots.RootResult):
                    root, error, iterations = outcome.root, outcome.error, outcome.iterations
                else:
                    root, error, iterations = outcome, residual(outcome, damped, args.p), 0
                rows.append(
                    {
                        "n": n,
                        "condition": condition,
                        "p": args.p,
                        "method": name,
                        "seconds": medians[name],
                        "min_seconds": min(times[name]),
                        "all_seconds": times[name],
                        "cpu_per_wall": sum(cpu_times[name]) / sum(times[name]),
                        "iterations": int(iterations),
                        "error": float(error),
                        "relative_distance_to_eigh": float(
                            np.linalg.norm(root - reference) / np.linalg.norm(reference)
                        ),
                        "ratio_to_eigh_bare": medians[name] / medians["eigh_bare"],
                        "ratio_to_eigh": medians[name] / medians["eigh"],
                    }
                )
            print(f"n={n} cond={condition:.0e} done", file=sys.stderr, flush=True)
    return rows


def eigh_root(damped: np.ndarray, p: int) -> np.ndarray:
    """`damped^(-1/p)` from `np.linalg.eigh`, eigenvalues clamped at the tiniest float."""
    eigenvalues, vectors = np.linalg.eigh(damped)
    eigenvalues = np.maximum(eigenvalues, np.finfo(np.float64).tiny)
    return (vectors * eigenvalues ** (-1.0 / p)) @ vectors.T


def svd_root(damped: np.ndarray, p: int) -> np.ndarray:
    """`damped^(-1/p)` from `np.linalg.svd` (equal to eigh for a PD matrix)."""
    _, singular_values, right = np.linalg.svd(damped)
    return (right.T * singular_values ** (-1.0 / p)) @ right


def residual(root: np.ndarray, damped: np.ndarray, p: int) -> float:
    """max|root^p·damped − I| (untimed)."""
    return float(np.max(np.abs(np.linalg.matrix_power(root, p) @ damped - np.eye(len(root)))))


def print_table(rows: list[dict]) -> None:
    """Prints one line per (threads, n, condition): times and the schur_newton figures."""
    cases = sorted({(r["threads"], r["n"], r["condition"]) for r in rows})
    header = (
        f"{'thr':>3} {'n':>5} {'cond':>6} "
        + " ".join(f"{m:>18}" for m in METHOD_NAMES)
        + f" {'SN/eigh_bare':>12} {'SN/eigh':>7} {'SN iters':>8} {'SN error':>9}"
        + f" {'SN dist':>9}"
    )
    print(header)
    for threads, n, condition in cases:
        by_method = {
            r["method"]: r
            for r in rows
            if (r["threads"], r["n"], r["condition"]) == (threads, n, condition)
        }
        newton = by_method["schur_newton"]
        print(
            f"{threads:>3} {n:>5} {condition:>6.0e} "
            + " ".join(f"{by_method[m]['seconds']:>17.4f}s" for m in METHOD_NAMES)
            + f" {newton['ratio_to_eigh_bare']:>12.2f} {newton['ratio_to_eigh']:>7.2f}"
            + f" {newton['iterations']:>8d}"
            + f" {newton['error']:>9.1e} {newton['relative_distance_to_eigh']:>9.1e}"
        )


def plot(rows: list[dict], path: str, p: int) -> None:
    """Time vs n per method, log-log, one panel per thread setting (largest condition)."""
    plt = harness.pyplot()
    thread_counts = sorted({r["threads"] for r in rows})
    condition = max(r["condition"] for r in rows)
    figure, axes = plt.subplots(
        1, len(thread_counts), figsize=(6 * len(thread_counts), 4.5), sharey=True, squeeze=False
    )
    for axis, threads in zip(axes[0], thread_counts, strict=True):
        for method in METHOD_NAMES:
            points = sorted(
                (r["n"], r["seconds"])
                for r in rows
                if r["threads"] == threads and r["method"] == method and r["condition"] == condition
            )
            axis.loglog(*zip(*points, strict=True), marker="o", label=method)
        axis.set_title(f"{threads} BLAS thread(s), p={p}, condition {condition:.0e}")
        sizes = sorted({r["n"] for r in rows})
        axis.set_xticks(sizes, labels=[str(n) for n in sizes])
        axis.set_xticks([], minor=True)
        axis.set_xlabel("n")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median seconds")
    axes[0][0].legend()
    harness.save_figure(figure, path)


if __name__ == "__main__":
    main()
