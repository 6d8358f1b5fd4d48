"""What every benchmark's JSON records about where it ran: commit, machine, libraries."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=REPO_ROOT
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def git_commit() -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether the code differs from HEAD (None outside a git checkout).

    Benchmark outputs (benchmarks/) are not code: a benchmark run after another in the
    same checkout is not dirty for the first one's result file.
    """
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks")
    return None if status is None else bool(status)


def machine_info() -> dict:
    """CPU model and count, platform, Python, NumPy and its BLAS, date (UTC)."""
    cpu_model = platform.processor() or None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = {key: blas.get(key) for key in ("name", "version", "openblas configuration")}
    except (KeyError, TypeError, ValueError):  # Older NumPy has no dicts mode.
        blas = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "blas": blas,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
